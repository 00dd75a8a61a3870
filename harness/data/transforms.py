"""Train/test transforms built from the data section and the backbone's declared ``DataConfig``.

The backbone declares its input convention (input/resize size, mean, std, channel order, scale,
input channels); transforms read it, so a user never retypes those numbers. Two families:

- ``imagenet`` (photos): train RandomResizedCrop(input, scale=(0.16, 1)) + horizontal flip;
  test Resize(resize) + CenterCrop(input).
- ``grey`` (small grey in-memory images: digits, Fashion-MNIST): train a small random translation
  (RandomCrop with padding input/8, at least 1 pixel), no flip (digits are not mirror-symmetric);
  test none. Both resize to the input size first (a no-op when the sizes already match).

``auto`` picks grey for 1-channel datasets and imagenet otherwise. Images are converted to the
backbone's ``in_channels`` (grey replicated to 3 channels, colour to grey), then ToTensor, then the
declared convention (×255 and RGB→BGR for Caffe-style weights such as BN-Inception), then
normalisation with the declared mean/std (which are therefore given in that convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
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


def build_transforms(
    data: DataSection, data_config: DataConfig, channels: int
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(train transform, test transform) for images with ``channels`` channels fed to a backbone
    that declares ``data_config``."""
    dc = data_config
    assert len(dc.mean) == len(dc.std) == dc.in_channels, f"inconsistent {dc}"
    kind = data.transform if data.transform != "auto" else ("grey" if channels == 1 else "imagenet")
    size, resize = sizes(data, dc)
    convert: list[Callable] = [T.Grayscale(dc.in_channels)] if channels != dc.in_channels else []
    finish: list[Callable] = [T.ToTensor()]
    if dc.scale != 1.0 or dc.channel_order != "RGB":
        finish.append(ChannelConvention(dc.scale, dc.channel_order))
    finish.append(T.Normalize(dc.mean, dc.std))
    if kind == "imagenet":
        train = [T.RandomResizedCrop(size, scale=(0.16, 1.0)), T.RandomHorizontalFlip()]
        test = [T.Resize(resize), T.CenterCrop(size)]
    else:
        train = [T.Resize(size), T.RandomCrop(size, padding=max(1, size // 8))]
        test = [T.Resize(size), T.CenterCrop(size)]
    return T.Compose(convert + train + finish), T.Compose(convert + test + finish)
