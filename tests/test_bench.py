"""`dmlh bench data|train|gpu|fixture|losses` run end to end on tiny inputs (their figures are not checked
here: speed targets are measured by `dmlh bench`, never by timed tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harness import registry
from harness.bench import main
from harness.bench.components import bench_losses
from harness.bench.fixtures import write_cub_like
from harness.data.cache import decode_resized
from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput


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


@pytest.mark.cuda
def test_bench_gpu_on_a_gpu(capsys: pytest.CaptureFixture) -> None:
    main("gpu", ["--images", "256", "--batches", "2", "--warmup", "1", "--eval-n", "2000"])
    assert "(c)/(b)" in capsys.readouterr().out


# ---- `dmlh bench losses`: rows printed as measured, exit status 1 on a missed target, --quick ----


class _ToyLoss(torch.nn.Module):
    """A loss whose forward sleeps ``delay`` seconds (its reference sleeps ``reference_delay``)."""

    delay = 0.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        time.sleep(self.delay)
        return LossOutput((embeddings**2).mean())


def _toy(name: str, delay: float, reference_delay: float, on_build: Callable[[], Any] = lambda: None) -> None:
    """Register toy loss ``name``; ``on_build`` is called when the benchmark builds its reference."""

    def reference(_c: int, _d: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        on_build()
        return lambda e, y: time.sleep(reference_delay) or (e**2).mean()

    loss = type(name, (_ToyLoss,), {"delay": delay})
    register("loss", name, replace=True, references=lambda: [Reference(reference, variant="toy")])(loss)


@pytest.fixture
def toy_losses() -> Iterator[Callable[..., None]]:
    """Registers toy losses for one test, then takes them out of the session's loss registry again."""
    names: list[str] = []

    def add(name: str, *args: Any, **kwargs: Any) -> None:
        names.append(name)
        _toy(name, *args, **kwargs)

    yield add
    for name in names:
        registry.registry("loss")._entries.pop(name)


TINY = ["--sizes", "8", "--dim", "4", "--repeats", "1", "--warmup", "0"]


def test_bench_losses_exits_1_and_lists_the_missed_rows_last(
    toy_losses: Callable[..., None], capsys: pytest.CaptureFixture
) -> None:
    seen: list[str] = []  # what was printed when the second loss's reference was built
    toy_losses("toy_slow", 0.02, 0.0)  # 20 ms against an instant reference: misses its target
    toy_losses("toy_fast", 0.0, 0.02, on_build=lambda: seen.append(capsys.readouterr().out))
    with pytest.raises(SystemExit) as exit_info:
        main("losses", ["--only", "toy_slow", "toy_fast", *TINY])
    assert exit_info.value.code == 1
    assert any(line.startswith("toy_slow") and line.rstrip().endswith("NO") for line in seen[0].splitlines())
    out = seen[0] + capsys.readouterr().out  # the first row was printed before the second was measured
    missed = out.split("1 of 2 rows missed their target:")[1].splitlines()
    assert [line.split()[0] for line in missed if line.startswith("toy")] == ["toy_slow"]
    assert bench_losses(["--only", "toy_fast", *TINY]) == 0  # called directly: the status is returned
    assert "all 1 rows within their targets" in capsys.readouterr().out


def test_bench_losses_quick_runs_b128_only(
    toy_losses: Callable[..., None], capsys: pytest.CaptureFixture
) -> None:
    toy_losses("toy_fast", 0.0, 0.005)
    main("losses", ["--quick", "--only", "toy_fast", "--dim", "4"])  # within target: no SystemExit
    out = capsys.readouterr().out
    assert "B=128, median of 7 forward+backward runs" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("toy_fast")]
    assert [row[2] for row in rows] == ["128"] and rows[0][-1] == "yes"
