"""Bad image files are found before training (issue #10): `dmlh data check` decodes every image and lists
each bad one with the reason, a run refuses to start on them (or drops them with `data.skip_bad`), decoded
files are remembered by size + mtime; silent data adjustments are logged warnings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.config import DataSection, validate
from harness.data import ImageSet, PKSampler, carve_validation, check_dataset, load_splits, verify
from harness.errors import DatasetError
from harness.train import run
from tests.fixtures import garbage_jpeg, make_cub200, truncate_jpeg


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DMLH_CACHE", str(cache))
    return cache


def _bad_cub(root: Path) -> tuple[Path, Path, Path]:
    """A CUB-layout fixture with one truncated JPEG (train class 1) and one garbage file (test class 101)."""
    make_cub200(root)
    truncated = truncate_jpeg(root / "images/001.Class_1/Class_1_0001_1.jpg")
    garbage = garbage_jpeg(root / "images/101.Class_101/Class_101_0002_101.jpg")
    return root, truncated, garbage


def test_data_check_lists_each_bad_file_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, truncated, garbage = _bad_cub(tmp_path / "cub")
    with pytest.raises(DatasetError, match="2 of 12 image files cannot be used") as e:
        check_dataset("cub200", str(root))
    msg = str(e.value)
    assert f"{truncated}: cannot be decoded (image file is truncated" in msg
    assert f"{garbage}: not an image file" in msg
    assert main(["data", "check", "cub200", "--root", str(root), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and str(garbage) in err
    truncated.unlink()
    with pytest.raises(DatasetError, match=f"{truncated}: missing"):
        check_dataset("cub200", str(root))


def test_run_refuses_to_start_on_bad_images(tmp_path: Path) -> None:
    root, truncated, garbage = _bad_cub(tmp_path / "cub")
    cfg = validate(
        {
            "data": {"dataset": {"name": "cub200", "root": str(root)}, "val_fraction": 0, "input_size": 16},
            "sampler": {"p": 2, "k": 2},
            "backbone": {"name": "small_convnet", "width": 4},
            "train": {"epochs": 1, "device": "cpu"},
        }
    )
    with pytest.raises(DatasetError, match="data.skip_bad=true") as e:
        run(cfg)
    assert str(truncated) in str(e.value) and str(garbage) in str(e.value)


def test_skip_bad_drops_bad_files_and_says_how_many(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, truncated, garbage = _bad_cub(tmp_path / "cub")
    section = DataSection(dataset={"name": "cub200", "root": str(root)}, val_fraction=0, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(section)
    assert "drops 2 bad image files (1 of 6 from train, 1 of 6 from test)" in caplog.text
    assert len(splits.train) == 5 and len(splits.test) == 5
    kept = {str(p) for p in [*splits.train.items, *splits.test.items]}
    assert str(truncated) not in kept and str(garbage) not in kept


def test_verified_files_are_remembered_until_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache: Path
) -> None:
    root = make_cub200(tmp_path / "cub")
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    decoded: list[str] = []
    real = verify.decode_problem

    def counting(path: str) -> str | None:
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(verify, "decode_problem", counting)
    assert verify.verify_images(paths) == []
    assert sorted(decoded) == paths and list(_cache.glob("verified/*.json"))
    decoded.clear()
    assert verify.verify_images(paths) == []
    assert decoded == []  # a second run (or trial) only stats the files
    truncate_jpeg(Path(paths[3]))
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    bad = verify.verify_images(paths)
    assert decoded == [paths[3]] and [p for p, _ in bad] == [paths[3]]
    decoded.clear()
    assert [p for p, _ in verify.verify_images(paths)] == [paths[3]]  # a bad file is never remembered as good
    assert decoded == [paths[3]]


def test_val_fraction_rounding_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    train = ImageSet(np.zeros((30, 2, 2), dtype=np.uint8), np.repeat(np.arange(10), 3))
    with caplog.at_level(logging.INFO):
        _, small = carve_validation(train, 0.01, seed=0)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert (
        "val_fraction=0.01 of 10 training classes rounds to 0 validation classes; using 2"
        in warned[0].message
    )
    assert "every val_fraction in [0, 0.25) gives this same split" in warned[0].message
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, same = carve_validation(train, 0.2, seed=0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "every val_fraction in [0, 0.25) gives this same split" in caplog.text
    assert small is not None and same is not None
    assert set(small.labels.tolist()) == set(same.labels.tolist())  # what the messages promise
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        carve_validation(train, 0.95, seed=0)
    assert (
        "rounds to 10 validation classes; using 8 (at least 2 classes must remain to train on)" in caplog.text
    )


def test_k_larger_than_a_class_says_how_many_are_padded(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.array([0] * 5 + [1] * 2 + [2] * 3 + [3] * 6 + [4])
    with caplog.at_level(logging.WARNING):
        PKSampler(labels, p=3, k=4)
    assert "sampler.k=4 is larger than the image count of 2 of 4 classes" in caplog.text
    assert "smallest class: 2 images" in caplog.text
    assert "1 of 5 classes have a single image and are dropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        PKSampler(labels, p=3, k=2)
    assert "sampler.k" not in caplog.text
