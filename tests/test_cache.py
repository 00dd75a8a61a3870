"""The decoded-image cache (harness/data/cache.py): same tensors as decoding, invalidation, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from harness import config
from harness.data import ImageSet, build_transforms, load_splits
from harness.data.cache import DecodedCache, attach, cache_key, cache_root, cached_splits, choose, num_workers
from harness.data.transforms import recipe_sizes
from harness.train import run
from harness.types import DataConfig
from tests.fixtures import make_cub200

DC = DataConfig(input_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _photos(folder: Path, shapes: list[tuple[int, int]]) -> list[str]:
    """JPEGs of the given (width, height), smooth gradients plus noise (like photos, unlike flat colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(shapes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


SHAPES = [(50, 37), (37, 50), (28, 28), (64, 31), (20, 45), (33, 33)]


def test_cached_pixels_equal_decode_then_torchvision_resize(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", SHAPES)
    boxes = np.array([[2, 3, 30, 33]] * len(paths), dtype=np.float64)
    for where in ("disk", "memory"):
        for bx in (None, boxes):
            cache = DecodedCache.build(paths, bx, 28, where)
            for i, p in enumerate(paths):  # the naive reference: PIL decode, crop, torchvision Resize(28)
                img = Image.open(p).convert("RGB")
                img = img.crop(tuple(bx[i])) if bx is not None else img
                want = np.asarray(T.Resize(28)(img))
                assert cache[i].shape == want.shape and min(want.shape[:2]) == 28
                np.testing.assert_array_equal(cache[i], want)


def test_cached_and_uncached_pipelines_give_the_same_tensors(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", SHAPES)
    labels = np.arange(len(paths)) % 2
    plain = ImageSet(paths, labels)
    cached = attach({"x": plain}, "disk", 28, 1.0)["x"]
    assert cached.cache is not None and plain.cache is None
    section = config.DataSection(dataset="cub200")
    train_tf, test_tf = build_transforms(section, DC, 3)
    for i in range(len(paths)):  # test transform: Resize(28) is a no-op on the cached image
        torch.testing.assert_close(cached.with_transform(test_tf)[i][0], plain.with_transform(test_tf)[i][0])
    resized_first = T.Compose([T.Resize(28), train_tf])  # what the cache stores, then the train transform
    for i in range(len(paths)):
        torch.manual_seed(i)
        a = cached.with_transform(train_tf)[i][0]
        torch.manual_seed(i)
        b = plain.with_transform(resized_first)[i][0]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sub = cached.subset([4, 1])  # subsets keep their rows
    np.testing.assert_array_equal(np.asarray(sub.image(0)), cached.cache[4])


def test_a_changed_file_invalidates_the_cache(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", SHAPES[:3])
    first = DecodedCache.build(paths, None, 28)
    again = DecodedCache.build(paths, None, 28)
    assert again.folder == first.folder
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a different mtime even on coarse file systems
    changed = DecodedCache.build(paths, None, 28)
    assert changed.folder != first.folder
    assert changed[1].shape == (28, 42, 3) and changed[1].max() == 0
    np.testing.assert_array_equal(changed[0], first[0])
    assert cache_key(paths, None, 28) != cache_key(paths, None, 30)


def _build_in_child(paths: list[str], queue: multiprocessing.Queue) -> None:
    cache = DecodedCache.build(paths, None, 28)
    queue.put((str(cache.folder), [cache[i].sum() for i in range(len(paths))]))


def test_two_processes_building_the_same_cache(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", SHAPES * 20)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(paths, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    folder = Path(results[0][0])
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]
    assert leftovers == []  # the loser's temporary copy is removed
    want = [np.asarray(T.Resize(28)(Image.open(p).convert("RGB"))).sum() for p in paths]
    assert results[0][1] == want


def test_rename_lost_to_another_writer_opens_the_winner(tmp_path: Path, monkeypatch) -> None:
    paths = _photos(tmp_path / "img", SHAPES[:2])
    winner = DecodedCache.build(paths, None, 28)
    real_is_file = Path.is_file
    misses = [True]  # the first existence check misses, as if the other writer were not done yet

    def is_file(self: Path) -> bool:
        return False if misses and misses.pop() else real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    renames: list[str] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append(str(b)) or real_rename(a, b))
    late = DecodedCache.build(paths, None, 28)
    assert late.folder == winner.folder and renames == [str(winner.folder)] and not misses
    np.testing.assert_array_equal(late[1], winner[1])


def test_disk_cache_pickles_without_its_pixels(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", [(400, 300)] * 4)
    cache = DecodedCache.build(paths, None, 256)
    _ = cache[0]  # maps the file
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000 < cache.nbytes
    np.testing.assert_array_equal(pickle.loads(blob)[3], cache[3])
    memory = DecodedCache.build(paths, None, 256, "memory")
    assert len(pickle.dumps(memory)) > memory.nbytes


def test_auto_respects_the_budget(tmp_path: Path) -> None:
    assert choose("auto", 100, 256, budget_gib=1.0) == "disk"
    assert choose("auto", 100_000, 256, budget_gib=1.0) == "off"
    assert choose("memory", 100_000, 256, budget_gib=1.0) == "memory"
    paths = _photos(tmp_path / "img", SHAPES[:2])
    parts = {"x": ImageSet(paths, [0, 1])}
    assert attach(parts, "auto", 28, 1e-9)["x"].cache is None
    assert attach(parts, "off", 28, 1.0)["x"].cache is None


def test_num_workers_auto(tmp_path: Path) -> None:
    section = config.DataSection(dataset={"name": "synthetic"})
    assert num_workers(section, load_splits(section)) == 0  # in-memory: nothing to decode
    root = str(make_cub200(tmp_path / "cub"))
    cub = config.DataSection(dataset={"name": "cub200", "root": root}, val_fraction=0)
    assert num_workers(cub, load_splits(cub)) == max(0, min(8, len(os.sched_getaffinity(0)) - 1))
    assert (
        num_workers(config.DataSection(dataset=cub.dataset, val_fraction=0, num_workers=3), load_splits(cub))
        == 3
    )
    with pytest.raises(Exception, match="num_workers"):
        config.validate({"data": {"num_workers": -1}})


def test_splits_share_one_cache_and_training_uses_it(tmp_path: Path) -> None:
    root = make_cub200(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per_class=4, size=40)
    section = config.DataSection(
        dataset={"name": "cub200", "root": str(root)}, cache="disk", val_fraction=0.5
    )
    splits = cached_splits(load_splits(section), section, DC)
    assert splits.train.cache is splits.val.cache is splits.test.cache
    assert len(splits.train.cache) == 24 and splits.train.cache[0].shape == (28, 28, 3)
    cfg = config.validate(
        {
            "data": {"dataset": {"name": "cub200", "root": str(root)}, "cache": "disk", "num_workers": 1},
            "sampler": {"p": 2, "k": 2, "batches_per_epoch": 2},
            "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
            "model": {"name": "embedder", "embedding_dim": 8},
            "train": {"epochs": 1},
            "eval": {"nmi": False},
        }
    )
    before = set(cache_root().iterdir())
    result = run(cfg)
    assert np.isfinite(result.metrics["test/recall@1"])
    assert len(set(cache_root().iterdir()) - before) == 1  # the cache of the run's resize size


@pytest.mark.parametrize("kind", ["imagenet", "symm_official", "mdr_official", "abe_official"])
def test_the_cache_keeps_the_largest_size_a_recipe_crops_from(tmp_path: Path, kind: str) -> None:
    """Every recipe's training crops are cut from an image resized to its resize size (symm: 256/227 of
    the input): a cache at the input size would make them upsampled, softer than the paper's."""
    root = make_cub200(tmp_path / "cub", classes=(1, 2, 101), per_class=2, size=120)
    section = config.DataSection(
        dataset={"name": "cub200", "root": str(root)},
        cache="disk",
        val_fraction=0,
        input_size=64,
        transform=kind,
    )
    size, resize = recipe_sizes(section, DC, kind)
    assert resize > size
    shorter = min(cached_splits(load_splits(section), section, DC).train.cache[0].shape[:2])
    assert shorter == resize


def test_one_cache_per_set_of_files_whatever_the_split(tmp_path: Path) -> None:
    """Issue #31, item 5: another validation carve-out (or split seed) lists the same files in another order;
    it must open the same cache, not decode a second copy, and every part still reads its own images."""
    from harness.data.cache import decode_resized

    root = make_cub200(tmp_path / "cub", classes=(1, 2, 3, 4, 5, 6, 101, 102), per_class=3, size=40)
    folders = set()
    for fraction, seed in ((0.0, 0), (0.5, 0), (0.5, 1)):
        section = config.DataSection(
            dataset={"name": "cub200", "root": str(root)},
            cache="disk",
            val_fraction=fraction,
            split_seed=seed,
        )
        splits = cached_splits(load_splits(section), section, DC)
        assert splits.train.cache is not None
        folders.add(splits.train.cache.folder)
        for part in (p for p in (splits.train, splits.val, splits.test) if p is not None):
            for i in range(len(part)):
                want = decode_resized(part.items[i], None, 28)
                np.testing.assert_array_equal(np.asarray(part.image(i)), want)
    assert len(folders) == 1
