"""Batched augmentation (harness.data.batch_augment): the same crop distributions as the PIL recipes
(torchvision's own parameter draws as the reference), the same pixels as PIL for given crops, flips,
normalisation, reproducibility, and a training run through it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch.utils.data import default_collate
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from harness.bench.fixtures import write_cub_like
from harness.config import validate
from harness.data.batch_augment import (
    BatchAugment,
    CachedCrop,
    Canvas,
    batch_augment_wanted,
    border_crop_boxes,
    build_batch_augment,
    crop_offsets,
    resized_crop_boxes,
)
from harness.data.cache import attach
from harness.data.datasets import synthetic
from harness.data.images import ImageSet
from harness.data.transforms import BORDER_CROP, CROP_RATIO, CROP_SCALE, RandomBorderCrop, build_transforms
from harness.errors import ConfigError
from harness.train import _Trainer, run
from harness.types import DataConfig

N = 4000  # draws per distribution comparison


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth colour patterns plus mild noise: resizing it is well defined to within a grey level."""
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).normal(0, 8, (h, w))
    rgb = [128 + 100 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 7), 60 + 2 * xx + yy + noise]
    return Image.fromarray(np.clip(np.stack(rgb, -1), 0, 255).astype(np.uint8))


def _augment(kind: str = "imagenet", size: int = 32, resize: int = 64, seed: int = 0, **dc) -> BatchAugment:
    config = DataConfig(input_size=size, resize_size=resize, **dc)
    return BatchAugment(kind, size, resize, config, 3, torch.device("cpu"), seed)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pil_boxes(h: int, w: int, scale: tuple[float, float]) -> np.ndarray:
    """``N`` (top, left, height, width) of torchvision's RandomResizedCrop.get_params."""
    img = torch.empty(1, h, w)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(CROP_RATIO)) for _ in range(N)])


def _features(boxes: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
    top, left, ch, cw = boxes.T.astype(float)
    return {
        "area": ch * cw / (h * w),
        "log_ratio": np.log(cw / ch),
        "centre_x": (left + cw / 2) / w,
        "centre_y": (top + ch / 2) / h,
    }


@pytest.mark.parametrize("h, w", [(64, 85), (40, 130)])  # a CUB-like photo; a panorama (many rejections)
def test_resized_crop_boxes_have_torchvision_distribution(h: int, w: int) -> None:
    ours = resized_crop_boxes(torch.tensor([[h, w]] * N), CROP_SCALE, CROP_RATIO, _generator()).numpy()
    theirs = _pil_boxes(h, w, CROP_SCALE)
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    a, b = _features(ours, h, w), _features(theirs, h, w)
    for name in a:
        assert stats.ks_2samp(a[name], b[name]).pvalue > 1e-3, name
    # the comparison has power: torchvision's default scale (0.08, 1) is told apart from (0.16, 1)
    other = _features(_pil_boxes(h, w, (0.08, 1.0)), h, w)
    assert stats.ks_2samp(a["area"], other["area"]).pvalue < 1e-6


def test_border_crop_and_random_crop_have_the_pil_distribution() -> None:
    h, w = 64, 85
    g = _generator()
    ours = border_crop_boxes(torch.tensor([[h, w]] * N), *BORDER_CROP, g).numpy()
    pil = RandomBorderCrop(*BORDER_CROP)
    sizes = np.array([pil(Image.new("L", (w, h))).size for _ in range(N)])  # (width, height)
    assert stats.ks_2samp(ours[:, 3], sizes[:, 0]).pvalue > 1e-3
    assert stats.ks_2samp(ours[:, 2], sizes[:, 1]).pvalue > 1e-3
    assert ours[:, :2].min() == 1 and ours[:, :2].max() == 3  # round(0.01..0.05 × 64)
    offsets = crop_offsets(torch.tensor([[40, 50]] * N), 32, g).numpy()
    img = torch.empty(1, 40, 50)
    theirs = np.array([T.RandomCrop.get_params(img, (32, 32))[:2] for _ in range(N)])
    for axis, room in ((0, 8), (1, 18)):
        counts = [np.bincount(o[:, axis], minlength=room + 1) for o in (offsets.astype(int), theirs)]
        assert len(counts[0]) == room + 1  # 0..room, both ends included
        assert stats.chi2_contingency(np.stack(counts)).pvalue > 1e-3


def test_canvases_of_arrays_equal_those_of_pil_images() -> None:
    aug = _augment(size=32, resize=64)  # canvas 64 × 96
    for h, w in [(64, 85), (85, 64), (64, 120), (30, 40)]:  # cached-like, portrait, too long, too small
        arr = np.asarray(_photo(h, w))
        ours, theirs = aug.canvas(arr), aug.canvas(Image.fromarray(arr))
        assert torch.equal(ours.pixels, theirs.pixels) and torch.equal(ours.sizes, theirs.sizes)
        rh, rw, transposed = ours.sizes.tolist()
        assert min(rh, rw) <= 64 and max(rh, rw) <= 96 and transposed == (h > w)
        assert (min(rh, rw) == 64) == (max(h, w) / min(h, w) <= 1.5)  # shorter side 64 unless too long


def _batch(augment: BatchAugment, images: list[Image.Image]) -> Canvas:
    return default_collate([augment.canvas(img) for img in images])


def _crop(augment: BatchAugment, img: Image.Image, geometry: list[list[float]], flip: bool = False):
    batch = _batch(augment, [img])
    g = torch.tensor([geometry], dtype=torch.float64)
    return augment.crop(batch, g, torch.tensor([flip]))[0].numpy()


def _chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1)


@pytest.mark.parametrize("upright", [True, False])
def test_crops_equal_pil_resized_crops(upright: bool) -> None:
    aug = _augment(size=32)
    img = _photo(64, 85) if upright else _photo(85, 64)  # a portrait is stored transposed in its canvas
    w, h = img.size
    cases = [(0, 0, h, w), (5, 10, 45, 41), (3, 7, 20, 17)]  # whole image, shrink, enlarge
    for top, left, ch, cw in cases:
        ours = _crop(aug, img, [[top, top + ch, 32, 0], [left, left + cw, 32, 0]])
        theirs = _chw(TF.resized_crop(img, top, left, ch, cw, [32, 32]))
        assert np.abs(ours - theirs).max() < 1.5  # PIL rounds to uint8 between its passes
        flipped = _crop(aug, img, [[top, top + ch, 32, 0], [left, left + cw, 32, 0]], flip=True)
        np.testing.assert_allclose(flipped, ours[:, :, ::-1], atol=1e-3)
    shifted = _crop(aug, img, [[5, 50, 32, 0], [12, 53, 32, 0]])  # the check tells a 2-pixel shift apart
    assert np.abs(shifted - _chw(TF.resized_crop(img, 5, 10, 45, 41, [32, 32]))).mean() > 3


def test_a_batch_of_short_images_contracts_over_their_columns_only_and_gives_the_same_pixels() -> None:
    aug = _augment(size=32)  # canvas 64 × 96
    short, portrait, wide = _photo(64, 70), _photo(75, 64), _photo(64, 96)
    boxes = [[[4, 60, 32, 0], [3, 66, 32, 0]], [[2, 70, 32, 0], [1, 60, 32, 0]]]
    g = torch.tensor(boxes, dtype=torch.float64)
    flip = torch.tensor([False, True])
    alone = aug.crop(_batch(aug, [short, portrait]), g, flip)  # contracts over 76 of the 96 columns
    beside = aug.crop(
        _batch(aug, [short, portrait, wide]), torch.cat([g, g[:1]]), torch.cat([flip, flip[:1]])
    )
    assert aug._used(_batch(aug, [short, portrait]).sizes, 1, 96) == 76
    torch.testing.assert_close(alone, beside[:2], rtol=0, atol=1e-3)


def test_symm_and_abe_crops_equal_their_pil_pipelines() -> None:
    img = _photo(36, 48)  # as the cache stores it: the shorter side at the recipe's resize size
    symm = _augment("symm_official", size=32, resize=36)
    top, left, bh, bw, i, j = 1, 2, 33, 45, 3, 1  # border crop, squash to 36×36, crop at (3, 1)
    theirs = TF.crop(TF.resize(TF.crop(img, top, left, bh, bw), [36, 36]), i, j, 32, 32)
    ours = _crop(symm, img, [[top, top + bh, 36, i], [left, left + bw, 36, j]])
    assert np.abs(ours - _chw(theirs)).max() < 1.5
    abe = _augment("abe_official", size=32, resize=40)
    padded = abe.canvas(img)
    assert padded.pixels.shape == (40, 40, 3) and padded.sizes.tolist() == [40, 40, 0]
    square = Image.fromarray(padded.pixels.numpy())
    ours = _crop(abe, img, [[0, 40, 40, 5], [0, 40, 40, 8]])
    np.testing.assert_allclose(ours, _chw(TF.crop(square, 5, 8, 32, 32)), atol=1e-3)  # exact pixels


def test_normalisation_equals_the_pil_transform_convention() -> None:
    aug = _augment(size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), channel_order="BGR", scale=255.0)
    img = _photo(32, 32)
    x = torch.from_numpy(_chw(img)).float()[None]
    data = validate({"data": {"transform": "imagenet", "input_size": 32, "resize_size": 32}}).data
    dc = DataConfig(32, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "BGR", 255.0)
    _, test_tf = build_transforms(data, dc, 3)  # resize + centre crop are no-ops at 32 px
    torch.testing.assert_close(aug.normalise(x)[0], test_tf(img), atol=1e-4, rtol=1e-5)


def test_batches_flip_half_and_repeat_with_the_seed() -> None:
    aug = _augment(size=16)
    ramp = Image.fromarray(np.broadcast_to(np.arange(0, 255, 3, dtype=np.uint8)[None, :, None], (64, 85, 3)))
    batch = _batch(aug, [ramp] * 1000)
    out = aug(batch)
    rising = (out[:, 0, :, -1] > out[:, 0, :, 0]).all(1)
    falling = (out[:, 0, :, -1] < out[:, 0, :, 0]).all(1)
    assert bool((rising | falling).all()) and abs(float(falling.float().mean()) - 0.5) < 0.05
    again = _augment(size=16)(batch)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert not torch.equal(_augment(size=16, seed=1)(batch), out)
    assert out.shape == (1000, 3, 16, 16) and out.dtype == torch.float32


def test_auto_batches_cached_photos_only() -> None:
    digits = synthetic(num_classes=4, per_class=2, channels=1).train
    auto = validate({}).data
    dc = DataConfig()
    assert build_batch_augment(auto, dc, digits, torch.device("cpu"), 0) is None  # in memory, grey
    forced = validate({"data": {"batch_augment": True}}).data
    with pytest.raises(ConfigError, match="data.batch_augment: the 'grey' transform is not batched"):
        build_batch_augment(forced, dc, digits, torch.device("cpu"), 0)


def test_auto_batches_on_cuda_only_and_the_cpu_augments_in_the_workers(tmp_path: Path) -> None:
    """At photo size the batched crop in the training process slowed the CPU step by 20 %: ``auto`` batches
    on CUDA only; on the CPU the workers crop the cached images (``CachedCrop``)."""
    root = write_cub_like(tmp_path / "small", 8, (30, 22), classes=2)
    files = ImageSet([str(p) for p in sorted((root / "images").rglob("*.jpg"))], [0] * 8)
    cached = attach({"train": files}, "memory", 18, 1.0)["train"]
    auto, forced = validate({}).data, validate({"data": {"batch_augment": True}}).data
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert build_batch_augment(auto, DataConfig(), cached, cpu, 0) is None
    assert isinstance(build_batch_augment(forced, DataConfig(), cached, cpu, 0), BatchAugment)
    assert not batch_augment_wanted(auto, "imagenet", True, cpu)
    assert batch_augment_wanted(auto, "imagenet", True, cuda)
    assert not batch_augment_wanted(auto, "imagenet", False, cuda)  # image files: decoded in the workers
    assert not batch_augment_wanted(auto, "grey", True, cuda)
    assert batch_augment_wanted(forced, "imagenet", True, cpu)
    cfg = _cub_config(tmp_path, cache="memory")
    trainer = _Trainer(validate(cfg))
    assert trainer.augment is None and isinstance(trainer.train_set.transform, CachedCrop)
    assert trainer.crops is trainer.train_set.transform  # the training process normalises its crops
    assert trainer.num_workers == 0  # as configured; auto keeps CPUs - 1 workers (test_cache)
    uncached = _Trainer(validate(_cub_config(tmp_path, cache="off")))
    assert not isinstance(uncached.train_set.transform, CachedCrop)  # JPEGs: the PIL transforms


@pytest.mark.parametrize(
    "kind, resize", [("imagenet", 64), ("symm_official", 36), ("mdr_official", 64), ("abe_official", 40)]
)
def test_cached_crops_draw_the_pil_boxes_and_give_its_pixels(kind: str, resize: int) -> None:
    """``CachedCrop`` draws what the recipe's PIL transform draws, from the same generator: for one seed the
    same box and flip, so its pixels are PIL's to within a grey level (PIL rounds between its two passes)."""
    dc = DataConfig(input_size=32, resize_size=resize, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    data = validate({"data": {"transform": kind, "input_size": 32, "resize_size": resize}}).data
    pil, _ = build_transforms(data, dc, 3)
    ours = CachedCrop(kind, 32, resize, dc, 3)
    grey = torch.tensor(dc.std).view(3, 1, 1) * 255  # one grey level in normalised units

    def crop(arr: np.ndarray) -> torch.Tensor:  # a worker's crop, normalised by the training process
        x = ours(arr)
        assert x.dtype == torch.uint8 and x.is_contiguous()
        return ours.normalise(x[None])[0]

    for seed in range(40):
        arr = np.asarray(_photo(*((64, 85) if seed % 2 else (85, 64)), seed))  # landscape and portrait
        torch.manual_seed(seed)
        a = crop(arr)
        torch.manual_seed(seed)
        b = pil(Image.fromarray(arr))
        assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32
        assert float(((a - b) * grey).abs().max()) <= 1.0 + 1e-3, seed
    other = np.asarray(_photo(64, 85, 1))
    torch.manual_seed(0)
    a = crop(other)
    torch.manual_seed(1)
    assert float(((a - pil(Image.fromarray(other))) * grey).abs().mean()) > 3  # the check has power
    if kind == "imagenet":  # the boxes are torchvision's own draws
        torch.manual_seed(3)
        box, _, _ = ours.geometry(64, 85)
        torch.manual_seed(3)
        assert box == tuple(
            T.RandomResizedCrop.get_params(torch.empty(1, 64, 85), list(CROP_SCALE), list(CROP_RATIO))
        )


def test_cached_crops_normalise_in_the_backbones_convention() -> None:
    dc = DataConfig(32, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "BGR", 255.0)
    data = validate({"data": {"transform": "imagenet", "input_size": 32, "resize_size": 32}}).data
    _, test_tf = build_transforms(data, dc, 3)  # resize + centre crop are no-ops at 32 px
    img = _photo(32, 32)
    crops = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())[None]
    ours = CachedCrop("imagenet", 32, 32, dc, 3).normalise(crops)[0]
    torch.testing.assert_close(ours, test_tf(img), atol=1e-4, rtol=1e-5)


def _cub_config(tmp_path: Path, **data) -> dict:
    root = write_cub_like(tmp_path / "cub", 48, (30, 22), classes=8)
    return {
        "data": {"dataset": {"name": "cub200", "root": str(root), "train_classes": 6}, "num_workers": 0}
        | data,
        "sampler": {"p": 2, "k": 2, "batches_per_epoch": 3},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
        "model": {"name": "embedder", "embedding_dim": 8},
        "eval": {"nmi": False},
        "train": {"device": "cpu", "epochs": 1},
    }


def test_training_through_the_cache_batches_its_augmentation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="harness"):
        result = run(
            validate(_cub_config(tmp_path, cache="memory", transform="symm_official", batch_augment=True))
        )
    assert "batched augmentation on cpu: BatchAugment(symm_official" in caplog.text
    assert np.isfinite(result.history[0]["train/loss"]) and 0 <= result.metrics["test/recall@1"] <= 1
    again = run(
        validate(_cub_config(tmp_path, cache="memory", transform="symm_official", batch_augment=True))
    )
    assert again.history[0]["train/loss"] == result.history[0]["train/loss"]  # reproducible


@pytest.mark.cuda  # augmentation on the device
def test_augmentation_on_the_gpu_equals_the_cpu() -> None:
    cpu = _augment(size=32)
    gpu = BatchAugment(
        "imagenet", 32, 64, DataConfig(input_size=32, resize_size=64), 3, torch.device("cuda"), 0
    )
    batch = _batch(cpu, [_photo(64, 85), _photo(85, 64, 1)])
    geometry = cpu.geometry(batch.sizes[:, :2])
    flip = torch.tensor([False, True])
    ours = gpu.crop(batch.to(torch.device("cuda")), geometry.cuda(), flip.cuda()).cpu()
    torch.testing.assert_close(ours, cpu.crop(batch, geometry, flip), atol=1e-2, rtol=1e-4)
    assert gpu(batch.to(torch.device("cuda"))).device.type == "cuda"
