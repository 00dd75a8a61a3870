"""The papers' official preprocessing recipes: geometry on real images of odd sizes (not squares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import DataSection
from harness.data.transforms import RandomBorderCrop, ResizePad, build_transforms
from harness.types import DataConfig

GOOGLENET = DataConfig(input_size=224, resize_size=256)


def photo(w: int, h: int) -> Image.Image:
    """A w × h RGB image: a red frame one pixel wide around a gradient (so crops and pads are visible)."""
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    x[..., 2] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    x[0, :] = x[-1, :] = x[:, 0] = x[:, -1] = (255, 0, 0)
    return Image.fromarray(x)


@pytest.mark.parametrize("size", [(500, 375), (333, 517)])
def test_border_crop_trims_each_side_by_one_to_five_percent_of_the_short_side(size: tuple[int, int]) -> None:
    w, h = size
    short = min(w, h)
    for seed in range(20):
        torch.manual_seed(seed)
        out = RandomBorderCrop(0.01, 0.05)(photo(w, h))
        dw, dh = w - out.size[0], h - out.size[1]
        assert 2 * round(0.01 * short) <= dw <= 2 * round(0.05 * short)
        assert 2 * round(0.01 * short) <= dh <= 2 * round(0.05 * short)
        assert np.asarray(out)[0, 0, 0] != 255 or np.asarray(out)[0, 0, 1] != 0  # the frame is gone


@pytest.mark.parametrize("size", [(500, 375), (333, 517)])
def test_resize_pad_keeps_the_aspect_ratio_and_pads_to_a_square(size: tuple[int, int]) -> None:
    w, h = size
    out = np.asarray(ResizePad(256)(photo(w, h)))
    assert out.shape == (256, 256, 3)
    content = np.argwhere(out.sum(axis=2) > 0)
    (top, left), (bottom, right) = content.min(0), content.max(0)
    cw, ch = right - left + 1, bottom - top + 1
    assert max(cw, ch) == 256
    assert abs(cw / ch - w / h) < 0.02  # aspect kept
    assert abs(top - (255 - bottom)) <= 1 and abs(left - (255 - right)) <= 1  # centred


def test_symm_official_squashes_to_1_125_input_and_tests_on_the_whole_squashed_image() -> None:
    data = DataSection(transform="symm_official", input_size=227)
    train, test = build_transforms(data, GOOGLENET, 3)
    img = photo(500, 375)
    assert train(img).shape == (3, 227, 227)
    names = [type(t).__name__ for t in train.transforms]
    assert names[:4] == ["RandomBorderCrop", "Resize", "RandomCrop", "RandomHorizontalFlip"]
    assert train.transforms[1].size == (255, 255)  # round(1.125 × 227): squash, aspect not kept
    assert [type(t).__name__ for t in test.transforms][0] == "Resize" and test.transforms[0].size == (
        227,
        227,
    )
    x = test(img)
    assert x.shape == (3, 227, 227)
    # the whole image is kept at test: the red frame shows on all four borders (red channel high)
    red = x[0] * 0.229 + 0.485
    assert min(red[0].mean(), red[-1].mean(), red[:, 0].mean(), red[:, -1].mean()) > 0.3
    assert red[100:120, 100:120].max() < 0.05  # (the inside has no red)


def test_mdr_official_squashes_to_256_then_crops_224() -> None:
    train, test = build_transforms(DataSection(transform="mdr_official"), GOOGLENET, 3)
    assert train.transforms[0].size == (256, 256) and test.transforms[0].size == (256, 256)
    rrc = train.transforms[1]
    assert type(rrc).__name__ == "RandomResizedCrop" and rrc.scale == (0.16, 1.0) and rrc.size == (224, 224)
    assert test.transforms[1].size == (224, 224)
    for w, h in [(500, 375), (333, 517)]:
        assert train(photo(w, h)).shape == test(photo(w, h)).shape == (3, 224, 224)


def test_abe_official_pads_crops_and_normalises_as_the_backbone_expects() -> None:
    dc = DataConfig(input_size=224, resize_size=256, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    train, test = build_transforms(DataSection(transform="abe_official"), dc, 3)
    assert type(train.transforms[0]).__name__ == "ResizePad" and train.transforms[0].size == 256
    norm = test.transforms[-1]
    assert tuple(norm.std) == (0.2, 0.2, 0.2) and tuple(norm.mean) == (0.5, 0.4, 0.3)  # the backbone's own
    white = Image.new("RGB", (333, 517), (255, 255, 255))
    x = test(white)
    assert x.shape == (3, 224, 224)
    centre = x[:, 112, 112]
    assert torch.allclose(centre, torch.tensor([2.5, 3.0, 3.5]), atol=1e-5)  # (1 − mean) / std
    assert train(white).shape == (3, 224, 224)
