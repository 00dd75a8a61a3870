"""A small VGG-style convnet for 8–96 px grey images (digits, Fashion-MNIST): CPU-scale ablations.

Its depth and downsampling follow ``input_size`` so that the receptive field covers the image: with a
fixed design (two poolings, single 3×3 convs) a 64 px image is seen through 20 px windows and a
retrieval model learns poorly (issue #13 reports Recall@1 0.17 against 0.61 for a VGG-style net with a
stride-2 stem and three pooled stages at equal steps).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Annotated

from pydantic import Field
from torch import nn

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig


def _block(cin: int, cout: int, convs: int, stride: int, pool: bool) -> nn.Sequential:
    """``convs`` conv-BN-ReLU layers (the first with ``stride``), then an optional 2× max-pool."""
    layers: list[nn.Module] = []
    for i in range(convs):
        first = i == 0
        conv = nn.Conv2d(cin if first else cout, cout, 3, stride if first else 1, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def auto_downsampling(input_size: int) -> int:
    """2× downsamplings that leave a final map of about 6×6: 2 up to 36 px (28 → 7×7), 3 at 64, 4 at 96."""
    return max(2, round(math.log2(input_size / 6)))


@register("backbone", "small_convnet")
class SmallConvNet(StagedBackbone):
    """VGG-style stages block1…blockN (widths w, 2w, 4w, 8w, 8w…), N = downsampling + 2.

    downsampling (None: from input_size, see ``auto_downsampling``): the number of 2× reductions. With 2
    (≤ 36 px) the net is the classic four single-conv blocks, pooled after block2 and block3 (28 → 7×7,
    8 → 2×2). With 3 or more, block1 is a stride-2 stem, blocks 2…N-1 end with a max-pool and every
    block has two convs (64 px → 8×8 map, receptive field 69 px). convs_per_block overrides the 1 / 2.
    No pretrained weights exist for it.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        width: int = 32,
        input_size: int = 28,
        downsampling: Annotated[int, Field(ge=0)] | None = None,
        convs_per_block: Annotated[int, Field(ge=1)] | None = None,
        frozen_bn: bool = False,
    ) -> None:
        n_down = auto_downsampling(input_size) if downsampling is None else downsampling
        stem_stride = 2 if n_down >= 3 else 1
        pooled = n_down - (stem_stride == 2)
        convs = convs_per_block or (2 if n_down >= 3 else 1)
        n_blocks = pooled + 2
        widths = [width * 2 ** min(i, 3) for i in range(n_blocks)]
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels, reductions, cin, reduction = {}, {}, in_channels, stem_stride
        for i, w in enumerate(widths, start=1):
            pool = 1 < i < n_blocks
            name = f"block{i}"
            stages[name] = _block(cin, w, convs, stem_stride if i == 1 else 1, pool)
            reduction *= 2 if pool else 1
            channels[name], reductions[name], cin = w, reduction, w
        grey = (0.5,) * in_channels
        data_config = DataConfig(
            input_size=input_size, resize_size=input_size, mean=grey, std=grey, in_channels=in_channels
        )
        super().__init__(stages, channels, data_config, reductions=reductions, frozen_bn=frozen_bn)
