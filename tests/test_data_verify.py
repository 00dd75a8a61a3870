"""Bad image files are found before training (issue #10): `dmlh data check` decodes every image and lists
each bad one with the reason, a run refuses to start on them (or drops them with `data.skip_bad`), decoded
files are remembered by size + mtime; silent data adjustments are logged warnings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.config import DataSection, validate
from harness.data import ImageSet, PKSampler, carve_validation, check_dataset, load_splits, verify
from harness.data.cache import DecodedCache
from harness.errors import ConfigError, DatasetError
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
    real = verify.decode_file

    def counting(path: str) -> verify.Decoded:
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(verify, "decode_file", counting)
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


def test_val_fraction_rounding_is_a_warning_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.data import splits

    monkeypatch.setattr(splits, "_WARNED", set())
    train = ImageSet(np.zeros((30, 2, 2), dtype=np.uint8), np.repeat(np.arange(10), 3))
    with caplog.at_level(logging.INFO):
        _, small = carve_validation(train, 0.01, seed=0)
        carve_validation(train, 0.01, seed=0)  # every trial of a study: said once (13 times before)
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


# -- images that decode but would train wrongly (issue #28, item 4) ---------------------------------------

MID_GREY_16 = 0x8080  # 32896: 128 in 8 bits, exactly


def _odd_cub(root: Path, tiny: bool = True) -> dict[str, Path]:
    """A CUB-layout fixture where some ``.jpg`` files are odd: a 1x1 JPEG and a float TIFF (bad), a CMYK
    JPEG, a 16-bit mid-grey PNG, an RGBA PNG (left half opaque red, right half transparent black) and a
    palette GIF (all converted)."""
    make_cub200(root)
    img = root / "images"
    odd = {
        "cmyk": img / "002.Class_2/Class_2_0000_2.jpg",
        "png16": img / "101.Class_101/Class_101_0000_101.jpg",
        "rgba": img / "102.Class_102/Class_102_0000_102.jpg",
        "palette": img / "102.Class_102/Class_102_0001_102.jpg",
    }
    Image.new("CMYK", (40, 40), (255, 0, 0, 0)).save(odd["cmyk"], format="JPEG")
    Image.fromarray(np.full((40, 40), MID_GREY_16, dtype=np.uint16)).save(odd["png16"], format="PNG")
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(odd["rgba"], format="PNG")
    Image.new("RGB", (40, 40), (0, 0, 255)).convert("P").save(odd["palette"], format="GIF")
    if tiny:
        odd["tiny"] = img / "001.Class_1/Class_1_0000_1.jpg"
        odd["float"] = img / "001.Class_1/Class_1_0001_1.jpg"
        Image.new("RGB", (1, 1), (10, 20, 30)).save(odd["tiny"], format="JPEG")
        Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)).save(odd["float"], format="TIFF")
    return odd


def test_data_check_finds_images_that_decode_but_would_train_wrongly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cub"
    odd = _odd_cub(root)
    with pytest.raises(DatasetError, match="2 of 12 image files cannot be used") as e:
        check_dataset("cub200", str(root))
    msg = str(e.value)
    assert f"{odd['tiny']}: 1x1 px: a side is shorter than data.min_side=8 px" in msg
    assert f"{odd['float']}: cannot be converted to RGB: floating-point pixels" in msg
    for name in ("cmyk", "png16", "rgba", "palette"):
        assert str(odd[name]) not in msg  # converted, not refused
    # the same rule before training: a run refuses them
    with pytest.raises(DatasetError, match="1x1 px"):
        load_splits(DataSection(dataset={"name": "cub200", "root": str(root)}, val_fraction=0))
    # data.min_side / --min-side moves the limit
    Image.new("RGB", (40, 40)).save(odd["float"], format="JPEG")
    assert main(["data", "check", "cub200", "--root", str(root), "--min-side", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK (12 image files decoded)" in out and "4 image files are converted to RGB when loaded" in out
    assert f"{odd['cmyk']}: CMYK converted to RGB" in out
    assert f"{odd['png16']}: 16-bit grey (I;16) scaled to 8 bits" in out
    assert f"{odd['rgba']}: alpha (RGBA) composited on white" in out
    assert f"{odd['palette']}: palette (P) converted to RGB" in out
    assert main(["data", "check", "cub200", "--root", str(root)]) == 2
    assert "1x1 px" in capsys.readouterr().err


def test_odd_images_train_as_what_they_show(tmp_path: Path) -> None:
    root = tmp_path / "cub"
    odd = _odd_cub(root, tiny=False)
    splits = load_splits(DataSection(dataset={"name": "cub200", "root": str(root)}, val_fraction=0))

    def trained(path: Path) -> np.ndarray:
        """The pixels (uint8 [H, W, 3]) the dataset hands to training for ``path``, checked to be those
        the decoded-image cache stores too."""
        for part in (splits.train, splits.test):
            hit = np.flatnonzero(part.items == str(path))
            if len(hit):
                x, _ = part[int(hit[0])]  # no transform: to_tensor of the image
                pixels = (x.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
                cached = DecodedCache.build([str(path)], None, 40, where="memory", workers=1)[0]
                np.testing.assert_array_equal(cached, pixels)
                return pixels
        raise AssertionError(f"{path} is in no split")

    grey = trained(odd["png16"])
    assert grey.shape == (40, 40, 3) and (grey == 128).all()  # mid-grey, not clipped to white
    cmyk = trained(odd["cmyk"]).astype(int)
    assert (abs(cmyk - [0, 255, 255]) <= 2).all()  # cyan
    rgba = trained(odd["rgba"])
    assert (rgba[:, :20] == [255, 0, 0]).all() and (rgba[:, 20:] == 255).all()  # transparent = white
    assert (trained(odd["palette"]) == [0, 0, 255]).all()


def test_skip_bad_names_the_dropped_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_cub200(tmp_path / "cub", per_class=12)
    files = sorted((root / "images").rglob("*.jpg"))
    tiny = files[0]
    Image.new("RGB", (3, 40)).save(tiny, format="JPEG")
    broken = [truncate_jpeg(p) for p in files[1:45:2]]
    section = DataSection(dataset={"name": "cub200", "root": str(root)}, val_fraction=0, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(section)
    assert len(broken) == 22 and len(splits.train) + len(splits.test) == 48 - 23
    assert "drops 23 bad image files (13 of 24 from train, 10 of 24 from test)" in caplog.text
    assert f"  - {tiny}: 3x40 px: a side is shorter than data.min_side=8 px" in caplog.text
    named = [p for p in broken if f"  - {p}: cannot be decoded" in caplog.text]
    assert len(named) == 19 and "  ... and 3 more" in caplog.text  # the first 20 by name, then a count


def test_the_decoding_count_leaves_out_missing_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_cub200(tmp_path / "cub")
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    os.unlink(paths[0])
    with caplog.at_level(logging.INFO):
        bad = verify.verify_images(paths, progress=False)
    assert bad == [(paths[0], "missing")]
    assert "decoding 11 image files (0 already verified, 1 missing or unreadable)" in caplog.text
    caplog.clear()
    st = os.stat(paths[5])
    os.utime(paths[5], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO):
        verify.verify_images(paths, progress=False)
    assert "decoding 1 image files (10 already verified, 1 missing or unreadable)" in caplog.text


def test_data_check_takes_the_split_rule_of_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_cub200(tmp_path / "cub", classes=(1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match="leaves the test split of cub200 empty") as e:
        check_dataset("cub200", str(root))
    assert "--train-classes" in str(e.value)
    assert main(["data", "check", "cub200", "--root", str(root), "--train-classes", "2"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {"train": ["6", "2"], "test": ["9", "3"]}
    # a class list, as digits and fashion_mnist take it
    assert main(["data", "check", "digits", "--train-classes", "0,1,2"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["train"][1] == "3" and rows["test"][1] == "7"
