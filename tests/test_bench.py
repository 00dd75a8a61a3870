"""`dmlh bench data|train|gpu|fixture` run end to end on tiny inputs (their figures are not checked here:
speed targets are measured by `dmlh bench`, never by timed tests)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from harness.bench import main
from harness.bench.fixtures import write_cub_like
from harness.data.cache import decode_resized


@pytest.fixture(autouse=True)
def _harness_log_level() -> Iterator[None]:
    """The benchmarks quieten the harness logger (a CLI choice); later tests expect it untouched."""
    logger = logging.getLogger("harness")
    level = logger.level
    yield
    logger.setLevel(level)


def _config(tmp_path: Path) -> Path:
    root = write_cub_like(tmp_path / "cub", 48, (30, 22), classes=8)
    cfg = {
        "data": {"dataset": {"name": "cub200", "root": str(root), "train_classes": 6}, "val_fraction": 0},
        "sampler": {"p": 2, "k": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
        "model": {"name": "embedder", "embedding_dim": 8},
        "train": {"device": "cpu"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fixture_is_a_cub_folder_of_photo_sized_jpegs(tmp_path: Path) -> None:
    root = write_cub_like(tmp_path / "cub", 10, (50, 37), classes=4)
    lines = (root / "image_class_labels.txt").read_text().split("\n")
    assert len(lines) == 11 and lines[4] == "5 1"
    first = (root / "images.txt").read_text().split()[1]
    assert decode_resized(str(root / "images" / first), None, 37).shape == (37, 50, 3)


def test_bench_data_measures_both_pipelines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    options = ["data.num_workers=0", "--batches", "2", "--warmup", "1", "--rounds", "2"]
    main("data", [str(_config(tmp_path)), *options])
    out = capsys.readouterr().out
    assert "medians of 2 interleaved rounds" in out
    for row in ("(a) input pipeline, JPEG", "(a) input pipeline, cached", "(b) training step", "(c)"):
        assert row in out
    assert "(c) pipeline + step, cached + batch augment" in out
    assert "cached / JPEG pipeline" in out and "cached + batch augment / JPEG pipeline" in out


def test_bench_train_compares_with_a_bare_loop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main("train", [str(_config(tmp_path)), "--batches", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "harness / bare = " in out and "bare PyTorch loop" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for CPU-only machines")
def test_bench_gpu_says_no_gpu_and_returns(capsys: pytest.CaptureFixture) -> None:
    main("gpu", [])
    assert "no GPU present" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_gpu_on_a_gpu(capsys: pytest.CaptureFixture) -> None:
    main("gpu", ["--images", "256", "--batches", "2", "--warmup", "1", "--eval-n", "2000"])
    assert "(c)/(b)" in capsys.readouterr().out
