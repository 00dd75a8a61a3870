"""A small convnet for 8×8 and 28×28 grey images (digits, Fashion-MNIST): CPU-scale ablations."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register("backbone", "small_convnet")
class SmallConvNet(StagedBackbone):
    """Four conv-BN-ReLU stages block1…block4 (widths w, 2w, 4w, 8w; 2× downsampling after 2 and 3).

    A 28×28 input gives a 7×7 map, an 8×8 input a 2×2 map. No pretrained weights exist for it.
    """

    def __init__(
        self, *, in_channels: int, width: int = 32, input_size: int = 28, frozen_bn: bool = False
    ) -> None:
        widths = [width, 2 * width, 4 * width, 8 * width]
        pools = [False, True, True, False]
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, (w, pool) in enumerate(zip(widths, pools, strict=True), start=1):
            stages[f"block{i}"] = _block(cin, w, pool)
            cin = w
        channels = {f"block{i}": w for i, w in enumerate(widths, start=1)}
        reductions = {"block1": 1, "block2": 2, "block3": 4, "block4": 4}
        grey = (0.5,) * in_channels
        data_config = DataConfig(
            input_size=input_size, resize_size=input_size, mean=grey, std=grey, in_channels=in_channels
        )
        super().__init__(stages, channels, data_config, reductions=reductions, frozen_bn=frozen_bn)
