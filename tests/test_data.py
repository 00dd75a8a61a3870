"""Data layer: dataset adapters on fixtures in the official layouts, errors that name the file, class-disjoint
validation carving, the P×K sampler and the transforms."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import registry
from harness.cli import main
from harness.config import DataSection
from harness.data import ImageSet, PKSampler, build_transforms, carve_validation, check_dataset, load_splits
from harness.data import datasets as ds_module
from harness.errors import ConfigError, DatasetError
from harness.types import DataConfig
from tests.fixtures import make_cars196, make_cub200, make_fashion_mnist, make_inshop, make_sop, write_idx


def build(name: str, **params: object) -> ds_module.DatasetSplits:
    return registry.build("dataset", name, path="data.dataset", **params)


def classes(images: ImageSet) -> set[int]:
    return set(images.labels.tolist())


def test_every_dataset_is_registered() -> None:
    names = set(registry.registry("dataset").names())
    assert {"synthetic", "digits", "fashion_mnist", "cub200", "cars196", "sop", "inshop"} <= names


# -- the four benchmarks on fixtures ---------------------------------------------------------------------


def test_cub200_splits_by_class_id(tmp_path: Path) -> None:
    root = make_cub200(tmp_path / "CUB_200_2011")
    d = build("cub200", root=str(root))
    assert (len(d.train), len(d.test), d.query) == (6, 6, None)
    assert classes(d.train) == {1, 2} and classes(d.test) == {101, 102}
    x, y = d.train[0]
    assert x.shape == (3, 40, 40) and y == 1
    assert classes(build("cub200", root=str(root), train_classes=1).train) == {1}
    # the parent folder of CUB_200_2011 works too
    assert len(build("cub200", root=str(tmp_path)).train) == 6


def test_bbox_crop(tmp_path: Path) -> None:
    cub = build("cub200", root=str(make_cub200(tmp_path / "cub")), bbox_crop=True)
    assert cub.train.image(0).size == (34, 32)  # x=2, y=3, w=34, h=32 in the fixture's bounding_boxes.txt
    cars = build("cars196", root=str(make_cars196(tmp_path / "cars")), bbox_crop=True)
    assert cars.train.image(0).size == (34, 32)  # x1, y1, x2, y2 = 2, 3, 36, 35


def test_cars196_splits_by_class(tmp_path: Path) -> None:
    d = build("cars196", root=str(make_cars196(tmp_path)))
    assert (len(d.train), len(d.test)) == (6, 6)
    assert classes(d.train) == {1, 2} and classes(d.test) == {99, 100}
    assert d.train.items[0] == str(tmp_path / "car_ims" / "000001.jpg")
    assert d.test[0][0].shape == (3, 40, 40)


def test_sop_reads_train_and_test_files(tmp_path: Path) -> None:
    d = build("sop", root=str(make_sop(tmp_path)))
    assert (len(d.train), len(d.test), d.query) == (6, 6, None)
    assert classes(d.train) == {1, 2, 3} and classes(d.test) == {4, 5, 6}
    assert d.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("eval_dir", [False, True])
def test_inshop_query_and_gallery(tmp_path: Path, eval_dir: bool) -> None:
    d = build("inshop", root=str(make_inshop(tmp_path, eval_dir=eval_dir)))
    assert d.query is not None
    assert (len(d.train), len(d.query), len(d.test)) == (4, 2, 4)
    assert classes(d.train) == {1, 2} and classes(d.query) == classes(d.test) == {3, 4}
    assert d.query[0][0].shape == (3, 32, 32)


BUILDERS = {"cub200": make_cub200, "cars196": make_cars196, "sop": make_sop, "inshop": make_inshop}


@pytest.mark.parametrize(
    "name, remove",
    [
        ("cub200", "image_class_labels.txt"),
        ("cub200", "images"),
        ("cars196", "cars_annos.mat"),
        ("sop", "Ebay_test.txt"),
        ("inshop", "list_eval_partition.txt"),
    ],
)
def test_missing_file_is_named(tmp_path: Path, name: str, remove: str) -> None:
    root = BUILDERS[name](tmp_path)
    target = root / remove
    if target.is_dir():
        for p in sorted(target.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DatasetError, match="expected layout") as e:
        build(name, root=str(root))
    assert str(root / remove) in str(e.value)


def _replace_line(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, file, line_no, text",
    [
        ("cub200", "images.txt", 3, "3"),
        ("cub200", "image_class_labels.txt", 2, "2 two"),
        ("sop", "Ebay_train.txt", 3, "2 1 1"),
        ("sop", "Ebay_test.txt", 1, "1 4 1 chair_final/x.JPG"),  # header missing
        ("inshop", "list_eval_partition.txt", 1, "99"),  # count does not match the rows
        ("inshop", "list_eval_partition.txt", 4, "img/a.jpg id_00000001 validation"),
        ("inshop", "list_eval_partition.txt", 5, "img/a.jpg 00000001 train"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, name: str, file: str, line_no: int, text: str) -> None:
    root = BUILDERS[name](tmp_path)
    _replace_line(root / file, line_no, text)
    with pytest.raises(DatasetError, match=f"line {line_no}") as e:
        build(name, root=str(root))
    assert str(root / file) in str(e.value)


def test_malformed_cars_annotations(tmp_path: Path) -> None:
    root = make_cars196(tmp_path)
    (root / "cars_annos.mat").write_bytes(b"not a matlab file")
    with pytest.raises(DatasetError, match="cars_annos.mat"):
        build("cars196", root=str(root))


def test_cub_ids_without_label(tmp_path: Path) -> None:
    root = make_cub200(tmp_path)
    path = root / "image_class_labels.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(DatasetError, match=r"image_class_labels.txt: no row for 1 image id\(s\).*\[12\]"):
        build("cub200", root=str(root))


def test_cut_off_that_empties_a_split_is_a_config_error(tmp_path: Path) -> None:
    root = make_cub200(tmp_path)
    with pytest.raises(ConfigError, match="train_classes.*test split"):
        build("cub200", root=str(root), train_classes=200)
    (root / "images.txt").write_text("")
    with pytest.raises(DatasetError, match="no images are listed"):
        build("cub200", root=str(root))


def test_root_from_dmlh_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sop(tmp_path / "Stanford_Online_Products")
    monkeypatch.setenv("DMLH_DATA", str(tmp_path))
    assert len(build("sop").train) == 6
    monkeypatch.delenv("DMLH_DATA")
    with pytest.raises(DatasetError, match="data.dataset.root"):
        build("sop")


# -- dmlh data check -------------------------------------------------------------------------------------


def test_check_dataset_counts_and_missing_images(tmp_path: Path) -> None:
    root = make_inshop(tmp_path)
    report = check_dataset("inshop", str(root))
    assert "OK" in report
    assert [line.split() for line in report.splitlines()[2:]] == [
        ["train", "4", "2"],
        ["gallery", "4", "2"],
        ["query", "2", "2"],
    ]
    gone = root / "img/WOMEN/Dresses/id_00000003/01_1_front.jpg"
    gone.unlink()
    with pytest.raises(DatasetError, match="1 of 10 image files cannot be used") as e:
        check_dataset("inshop", str(root))
    assert str(gone) in str(e.value)


def test_cli_data_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_cub200(tmp_path / "cub")
    assert main(["data", "check", "cub200", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"cub200 ({root}): OK" in out and "train" in out and "test" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", "cub200", "--root", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty / "images.txt") in err and str(empty / "image_class_labels.txt") in err

    assert main(["data", "check", "sop", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


# -- small in-memory datasets -----------------------------------------------------------------------------


def test_digits_default_split() -> None:
    d = build("digits")
    assert classes(d.train) == {0, 1, 2, 3, 4} and classes(d.test) == {5, 6, 7, 8, 9}
    assert len(d.train) + len(d.test) == 1797 and d.train.channels == 1
    assert d.train.items.dtype == np.uint8 and d.train.items.max() == 255
    assert classes(build("digits", train_classes=[1, 3]).train) == {1, 3}
    with pytest.raises(ConfigError, match="train_classes"):
        build("digits", train_classes=[11])


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b = build("synthetic", seed=3), build("synthetic", seed=3)
    assert np.array_equal(a.train.items, b.train.items)
    assert not np.array_equal(a.train.items, build("synthetic", seed=4).train.items)
    assert classes(a.train) == set(range(10)) and classes(a.test) == set(range(10, 20))
    # 1-NN on raw pixels of the unseen test classes is far above chance (1/10)
    x = a.test.items.reshape(len(a.test), -1).astype(np.float32)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert (a.test.labels[dist.argmin(1)] == a.test.labels).mean() > 0.8
    rgb = build("synthetic", channels=3, size=6)
    assert rgb.train.channels == 3 and rgb.train[0][0].shape == (3, 6, 6)


def test_fashion_mnist_lookup_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, home, system = tmp_path / "root", tmp_path / "home", tmp_path / "system"
    make_fashion_mnist(root, n_per_class=2)
    make_fashion_mnist(home / "fashion-mnist", n_per_class=3)
    make_fashion_mnist(system, n_per_class=4)
    monkeypatch.setattr(ds_module, "FASHION_SYSTEM_DIR", system)
    monkeypatch.setenv("DMLH_DATA", str(home))

    def per_class(**params: object) -> int:
        d = build("fashion_mnist", **params)
        assert classes(d.train) == set(range(6)) and classes(d.test) == {6, 7, 8, 9}
        return len(d.train) // 6 // 2  # train and t10k pooled

    assert per_class(root=str(root)) == 2
    assert per_class() == 3  # $DMLH_DATA/fashion-mnist
    make_fashion_mnist(home, n_per_class=5)
    assert per_class() == 5  # $DMLH_DATA itself comes first
    monkeypatch.delenv("DMLH_DATA")
    assert per_class(root=str(tmp_path / "nowhere")) == 4  # the system folder
    assert "nowhere does not hold the four IDX files" in caplog.text
    assert len(build("fashion_mnist", max_per_class=3).train) == 3 * 6
    monkeypatch.setattr(ds_module, "FASHION_SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as e:
        build("fashion_mnist", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value) and str(tmp_path / "none") in str(e.value)


def test_fashion_mnist_bad_idx_file(tmp_path: Path) -> None:
    root = make_fashion_mnist(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((3, 2), dtype=np.uint8))  # 2-D labels
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: not a uint8 IDX file"):
        build("fashion_mnist", root=str(root))


# -- ImageSet and validation carving ----------------------------------------------------------------------


def test_imageset_subset_relabel_and_transform() -> None:
    images = ImageSet(np.zeros((5, 4, 4), dtype=np.uint8), [7, 3, 7, 9, 3])
    sub = images.subset([0, 1, 3], relabel=True)
    assert sub.labels.tolist() == [1, 0, 2] and sub.num_classes == 3 and images.num_classes == 3
    assert images.subset([3, 4]).labels.tolist() == [9, 3]
    flat = images.with_transform(lambda img: torch.tensor(img.size))
    assert flat[0][0].tolist() == [4, 4] and images[0][0].shape == (1, 4, 4)


def _carve(n_classes: int, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    labels = np.repeat(np.arange(100, 100 + n_classes), 3)
    return carve_validation(ImageSet(np.zeros((len(labels), 2, 2), dtype=np.uint8), labels), fraction, seed)


def test_validation_classes_are_carved_from_training_classes() -> None:
    splits = load_splits(DataSection(dataset={"name": "synthetic", "num_classes": 40}, val_fraction=0.25))
    assert splits.val is not None and splits.query is None and splits.channels == 1
    assert splits.val.num_classes == 5 and splits.num_train_classes == 15
    assert classes(splits.train) == set(range(15))  # relabelled 0..C-1
    assert classes(splits.val) <= set(range(20))  # original training classes only, never test classes
    assert not classes(splits.val) & classes(splits.test)
    again = load_splits(DataSection(dataset={"name": "synthetic", "num_classes": 40}, val_fraction=0.25))
    assert classes(again.val) == classes(splits.val)
    other = load_splits(
        DataSection(dataset={"name": "synthetic", "num_classes": 40}, val_fraction=0.25, split_seed=1)
    )
    assert classes(other.val) != classes(splits.val)
    # the val images are exactly the training images of the val classes (disjoint from the train split)
    assert len(splits.train) + len(splits.val) == 20 * 20


def test_validation_sizes() -> None:
    train, val = _carve(10, 0.05)
    assert val is not None and val.num_classes == 2 and train.num_classes == 8  # at least 2
    train, val = _carve(10, 0.95)
    assert val is not None and train.num_classes == 2  # at least 2 left to train on
    train, val = _carve(10, 0.0)
    assert val is None and classes(train) == set(range(10))
    with pytest.raises(ConfigError, match="data.val_fraction"):
        _carve(3, 0.2)


# -- the P×K sampler --------------------------------------------------------------------------------------


def test_pk_batches() -> None:
    labels = np.repeat(np.arange(10), 6)
    sampler = PKSampler(labels, p=4, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # ceil(60 / 12)
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        values, counts = np.unique(labels[batch], return_counts=True)
        assert len(values) == 4 and (counts == 3).all()
    assert list(sampler) == batches  # same (seed, epoch): same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(PKSampler(labels, p=4, k=3, seed=1)) != batches
    assert len(PKSampler(labels, p=4, k=3, batches_per_epoch=7)) == 7


def test_pk_sampler_in_a_dataloader() -> None:
    images = ImageSet(np.zeros((24, 4, 4), dtype=np.uint8), np.repeat(np.arange(6), 4))
    loader = torch.utils.data.DataLoader(images, batch_sampler=PKSampler(images.labels, p=2, k=2, seed=0))
    x, y = next(iter(loader))
    assert x.shape == (4, 1, 4, 4) and len(set(y.tolist())) == 2


def test_pk_small_and_single_image_classes(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.array([0] * 5 + [1] * 2 + [2] * 6 + [3] + [4])  # class 1 has 2 images, 3 and 4 only one
    with caplog.at_level(logging.WARNING):
        sampler = PKSampler(labels, p=3, k=4, batches_per_epoch=20)
    assert "2 of 5 classes have a single image" in caplog.text
    for batch in sampler:
        drawn = labels[batch]
        assert not np.isin(drawn, [3, 4]).any()
        assert set(drawn.tolist()) == {0, 1, 2}  # the only 3 usable classes
        assert set(np.asarray(batch)[drawn == 1].tolist()) == {5, 6}  # both images of the small class
    with pytest.raises(ConfigError, match="sampler.p <= 3"):
        PKSampler(labels, p=4, k=2)


# -- transforms ---------------------------------------------------------------------------------------------

GREY_NET = DataConfig(input_size=8, resize_size=8, mean=(0.5,), std=(0.5,), in_channels=1)


def test_grey_transforms() -> None:
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    train_tf, test_tf = build_transforms(DataSection(), GREY_NET, channels=1)
    expected = (torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) * 4 / 255 - 0.5) / 0.5
    torch.testing.assert_close(test_tf(img), expected)
    torch.manual_seed(0)
    shifted = [train_tf(img) for _ in range(8)]
    assert all(t.shape == (1, 8, 8) for t in shifted) and any(not torch.equal(t, expected) for t in shifted)
    # a 3-channel backbone gets the grey image replicated; a different input size resizes
    rgb_net = DataConfig(input_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = build_transforms(DataSection(), rgb_net, channels=1)[1](img)
    assert out.shape == (3, 16, 16) and torch.equal(out[0], out[2])


def test_imagenet_transforms_and_sizes() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    dc = DataConfig(input_size=32, resize_size=40)
    train_tf, test_tf = build_transforms(DataSection(), dc, channels=3)
    assert train_tf(img).shape == test_tf(img).shape == (3, 32, 32)
    section = DataSection(input_size=16)  # resize keeps the backbone's 40/32 ratio → 20
    assert [type(t).__name__ for t in build_transforms(section, dc, 3)[1].transforms][:2] == [
        "Resize",
        "CenterCrop",
    ]
    assert build_transforms(section, dc, 3)[1].transforms[0].size == 20
    assert build_transforms(DataSection(transform="grey"), dc, 3)[0](img).shape == (3, 32, 32)
    # a colour dataset fed to a 1-channel backbone becomes grey
    grey = build_transforms(DataSection(), DataConfig(32, 40, (0.5,), (0.5,), in_channels=1), channels=3)[1]
    assert grey(img).shape == (1, 32, 32)


def test_bgr_255_convention() -> None:
    img = Image.new("RGB", (30, 30), (10, 20, 30))
    bn_inception = DataConfig(
        input_size=24,
        resize_size=28,
        mean=(104.0, 117.0, 128.0),
        std=(1.0, 1.0, 1.0),
        channel_order="BGR",
        scale=255.0,
    )
    out = build_transforms(DataSection(), bn_inception, channels=3)[1](img)
    expected = torch.tensor([30 - 104.0, 20 - 117.0, 10 - 128.0]).view(3, 1, 1).expand(3, 24, 24)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
