"""Train/test transforms built from the data section and the backbone's declared ``DataConfig``.

The backbone declares its input convention (input/resize size, mean, std, channel order, scale,
input channels); transforms read it, so a user never retypes those numbers. Two families:

- ``imagenet`` (photos): train RandomResizedCrop(input, scale=(0.16, 1)) + horizontal flip;
  test Resize(resize) + CenterCrop(input).
- ``grey`` (small grey in-memory images: digits, Fashion-MNIST): train a small random translation
  (RandomCrop with padding input/8, at least 1 pixel), no flip (digits are not mirror-symmetric);
  test none. Both resize to the input size first (a no-op when the sizes already match).

The papers' official preprocessing, as named recipes (sizes from ``data.input_size``/``resize_size``
when set, else the backbone's):

- ``symm_official`` (Gu & Ko's code): train a random border crop (each border trimmed by 1–5 % of the
  short side, independently: our reading of "random border crop"), squash to 1.125 × input, random crop
  of input, flip; test squash the whole image to input × input.
- ``mdr_official`` (Kim & Park's code): train squash to resize × resize (Lanczos), RandomResizedCrop(input,
  scale 0.16–1), flip; test squash to resize × resize, centre crop input.
- ``abe_official`` (Kim et al.): resize the longer side to resize keeping the aspect ratio and pad to a
  square (black; the fill is not published), random crop of input + flip for training, centre crop at
  test.

One rule for every recipe: a recipe decides the geometry only; the pixel values the backbone sees are
always what its weights expect (``normalisation``: its declared scale, channel order, mean and std). The
paper's Caffe GoogLeNet took mean-subtracted 0–255 BGR; the GoogLeNet weights here expect their own
``DataConfig``, so ``abe_official`` no longer keeps the paper's "mean subtraction only" (std 1), which fed
inputs at half the range those weights saw.

``auto`` picks grey for 1-channel datasets and imagenet otherwise. Images are converted to the
backbone's ``in_channels`` (grey replicated to 3 channels, colour to grey), then ToTensor, then the
declared convention (×255 and RGB→BGR for Caffe-style weights such as BN-Inception), then
normalisation with the declared mean/std (which are therefore given in that convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision import transforms as T

from harness.types import DataConfig

if TYPE_CHECKING:
    from harness.config import DataSection


class ChannelConvention:
    """Multiply a [C, H, W] tensor by ``scale`` and reverse its channels when ``channel_order`` is BGR."""

    def __init__(self, scale: float, channel_order: str):
        assert channel_order in ("RGB", "BGR"), f"unknown channel order {channel_order!r}"
        self.scale = scale
        self.bgr = channel_order == "BGR"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(0) if self.bgr else x
        return x * self.scale if self.scale != 1.0 else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, bgr={self.bgr})"


class RandomBorderCrop:
    """Trim each border of a PIL image by a random ``low``–``high`` fraction of its short side."""

    def __init__(self, low: float = 0.01, high: float = 0.05):
        self.low, self.high = low, high

    def box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop of a ``w`` × ``h`` image (one draw of 4 numbers
        from torch's global generator)."""
        left, top, right, bottom = (
            round(f * min(w, h)) for f in torch.empty(4).uniform_(self.low, self.high).tolist()
        )
        return left, top, w - right, h - bottom

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.crop(self.box(*img.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low={self.low}, high={self.high})"


class ResizePad:
    """Resize a PIL image so that its longer side is ``size`` (aspect ratio kept), then pad the shorter
    side equally on both ends to a ``size`` × ``size`` square."""

    def __init__(self, size: int, fill: int = 0):
        self.size, self.fill = size, fill

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        out = Image.new(img.mode, (self.size, self.size), self.fill)
        out.paste(img, ((self.size - nw) // 2, (self.size - nh) // 2))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


#: Resize size / input size of the symmetrical-synthesis recipe (official code: 1.125 × input).
SYMM_RESIZE_RATIO = 1.125
#: RandomResizedCrop's area fraction and aspect-ratio ranges (imagenet and mdr_official recipes).
CROP_SCALE = (0.16, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: The symm_official recipe's border crop: each border trimmed by this fraction of the short side.
BORDER_CROP = (0.01, 0.05)


def _recipe(kind: str, size: int, resize: int) -> tuple[list[Callable], list[Callable]]:
    """(train, test) geometry of transform family ``kind``."""
    if kind == "imagenet":
        return [T.RandomResizedCrop(size, CROP_SCALE, CROP_RATIO), T.RandomHorizontalFlip()], [
            T.Resize(resize),
            T.CenterCrop(size),
        ]
    if kind == "symm_official":
        return [
            RandomBorderCrop(*BORDER_CROP),
            T.Resize((resize, resize)),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
        ], [T.Resize((size, size))]
    if kind == "mdr_official":
        squash = T.Resize((resize, resize), interpolation=T.InterpolationMode.LANCZOS)
        return [squash, T.RandomResizedCrop(size, CROP_SCALE, CROP_RATIO), T.RandomHorizontalFlip()], [
            squash,
            T.CenterCrop(size),
        ]
    if kind == "abe_official":
        return [ResizePad(resize), T.RandomCrop(size), T.RandomHorizontalFlip()], [
            ResizePad(resize),
            T.CenterCrop(size),
        ]
    assert kind == "grey", f"unknown transform {kind!r}"
    return [T.Resize(size), T.RandomCrop(size, padding=max(1, size // 8))], [
        T.Resize(size),
        T.CenterCrop(size),
    ]


def sizes(data: DataSection, dc: DataConfig) -> tuple[int, int]:
    """(input size, resize size): ``data.input_size``/``data.resize_size`` when set, else the backbone's.

    Setting only ``data.input_size`` keeps the backbone's resize/input ratio (256/224 → 73 for 64).
    """
    size = data.input_size or dc.input_size
    if data.resize_size is not None:
        return size, data.resize_size
    if data.input_size is None:
        return size, dc.resize_size
    return size, round(size * dc.resize_size / dc.input_size)


def recipe_kind(data: DataSection, channels: int) -> str:
    """``data.transform`` with ``auto`` resolved: ``grey`` for 1-channel images, else ``imagenet``."""
    return data.transform if data.transform != "auto" else ("grey" if channels == 1 else "imagenet")


def recipe_sizes(data: DataSection, dc: DataConfig, kind: str) -> tuple[int, int]:
    """(input size, resize size) of recipe ``kind``: ``sizes``, except that symm_official resizes to
    ``SYMM_RESIZE_RATIO`` × input unless ``data.resize_size`` is set."""
    size, resize = sizes(data, dc)
    if kind == "symm_official" and data.resize_size is None:
        resize = round(SYMM_RESIZE_RATIO * size)
    return size, resize


def normalisation(dc: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that every recipe normalises with (after the backbone's scale and channel order): the
    backbone's own, whatever the recipe (the one rule of ``build_transforms`` and the batched augment)."""
    return tuple(dc.mean), tuple(dc.std)


def build_transforms(
    data: DataSection, data_config: DataConfig, channels: int
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(train transform, test transform) for images with ``channels`` channels fed to a backbone
    that declares ``data_config``."""
    dc = data_config
    assert len(dc.mean) == len(dc.std) == dc.in_channels, f"inconsistent {dc}"
    kind = recipe_kind(data, channels)
    size, resize = recipe_sizes(data, dc, kind)
    convert: list[Callable] = [T.Grayscale(dc.in_channels)] if channels != dc.in_channels else []
    finish: list[Callable] = [T.ToTensor()]
    if dc.scale != 1.0 or dc.channel_order != "RGB":
        finish.append(ChannelConvention(dc.scale, dc.channel_order))
    mean, std = normalisation(dc)
    finish.append(T.Normalize(mean, std))
    train, test = _recipe(kind, size, resize)
    return T.Compose(convert + train + finish), T.Compose(convert + test + finish)


def pil_steps(transform: object) -> T.Compose:
    """The steps of a ``build_transforms`` transform before ``ToTensor``: the PIL image the network sees
    (its crop and size), for figures that draw on it."""
    assert isinstance(transform, T.Compose), f"not a build_transforms transform: {transform!r}"
    steps = transform.transforms
    return T.Compose(steps[: next(i for i, t in enumerate(steps) if isinstance(t, T.ToTensor))])
