"""BN-Inception (Inception-v2, Ioffe & Szegedy 2015), the backbone of MS, Proxy-Anchor and MDR.

Layer names follow the widely used Caffe port (Cadene ``pretrainedmodels``: ``conv1_7x7_s2``,
``conv1_7x7_s2_bn``, ``inception_3a_1x1``, …), so its state dict (``bn_inception-52deb4733.pth``) loads as is;
its BN vectors stored as [1, C] are squeezed by the loader. Every conv is followed by BN and ReLU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig
from methods.backbones.weights import WeightsFile, load_pretrained

IMAGENET_WEIGHTS = WeightsFile(
    "bn_inception-52deb4733.pth", "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
)

_CHANNELS = {
    "conv1": 64, "pool1": 64, "conv2": 192, "pool2": 192, "inception3a": 256, "inception3b": 320,
    "inception3c": 576, "inception4a": 576, "inception4b": 576, "inception4c": 608, "inception4d": 608,
    "inception4e": 1056, "inception5a": 1024, "inception5b": 1024,
}  # fmt: skip

_REDUCTIONS = {
    "conv1": 2, "pool1": 4, "conv2": 4, "pool2": 8, "inception3a": 8, "inception3b": 8, "inception3c": 16,
    "inception4a": 16, "inception4b": 16, "inception4c": 16, "inception4d": 16, "inception4e": 32,
    "inception5a": 32, "inception5b": 32,
}  # fmt: skip

#: a conv step (name suffix, out channels, kernel, stride) or a parameter-free pooling step (suffix, module)
Step = tuple[str, int, int, int] | tuple[str, nn.Module]


class _Branches(nn.Module):
    """Parallel branches of conv-BN-ReLU (and pooling) steps, concatenated along channels.

    Layers are registered flat under ``<prefix>_<suffix>`` (BN: ``…_bn``) to match the Caffe-port keys.
    """

    def __init__(self, prefix: str, in_channels: int, branches: list[list[Step]]):
        super().__init__()
        self.branches: list[list[str]] = []
        for steps in branches:
            names, c = [], in_channels
            for step in steps:
                name = f"{prefix}_{step[0]}"
                if isinstance(step[1], nn.Module):
                    self.add_module(name, step[1])
                else:
                    _, cout, k, s = step
                    self.add_module(name, nn.Conv2d(c, cout, k, stride=s, padding=k // 2))
                    self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))
                    c = cout
                names.append(name)
            self.branches.append(names)

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            layer = getattr(self, name)
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = F.relu(getattr(self, f"{name}_bn")(x), inplace=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self._run(names, x) for names in self.branches]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)


def _max_pool(stride: int) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1 if stride == 1 else 0, ceil_mode=True)


def _inception(
    name: str, cin: int, c1: int, c3r: int, c3: int, cdr: int, cd: int, pool: nn.Module, cproj: int
) -> _Branches:
    """A stride-1 Inception-v2 module: 1x1 | 1x1→3x3 | 1x1→3x3→3x3 | pool→1x1."""
    return _Branches(f"inception_{name}", cin, [
        [("1x1", c1, 1, 1)],
        [("3x3_reduce", c3r, 1, 1), ("3x3", c3, 3, 1)],
        [("double_3x3_reduce", cdr, 1, 1), ("double_3x3_1", cd, 3, 1), ("double_3x3_2", cd, 3, 1)],
        [("pool", pool), ("pool_proj", cproj, 1, 1)],
    ])  # fmt: skip


def _reduction(name: str, cin: int, c3r: int, c3: int, cdr: int, cd: int) -> _Branches:
    """A stride-2 Inception-v2 module: 1x1→3x3/2 | 1x1→3x3→3x3/2 | maxpool/2 (channels pass through)."""
    return _Branches(f"inception_{name}", cin, [
        [("3x3_reduce", c3r, 1, 1), ("3x3", c3, 3, 2)],
        [("double_3x3_reduce", cdr, 1, 1), ("double_3x3_1", cd, 3, 1), ("double_3x3_2", cd, 3, 2)],
        [("pool", _max_pool(2))],
    ])  # fmt: skip


def _stages() -> OrderedDict[str, nn.Module]:
    s: OrderedDict[str, nn.Module] = OrderedDict()
    s["conv1"] = _Branches("conv1", 3, [[("7x7_s2", 64, 7, 2)]])
    s["pool1"] = _max_pool(2)
    s["conv2"] = _Branches("conv2", 64, [[("3x3_reduce", 64, 1, 1), ("3x3", 192, 3, 1)]])
    s["pool2"] = _max_pool(2)
    s["inception3a"] = _inception("3a", 192, 64, 64, 64, 64, 96, _avg_pool(), 32)
    s["inception3b"] = _inception("3b", 256, 64, 64, 96, 64, 96, _avg_pool(), 64)
    s["inception3c"] = _reduction("3c", 320, 128, 160, 64, 96)
    s["inception4a"] = _inception("4a", 576, 224, 64, 96, 96, 128, _avg_pool(), 128)
    s["inception4b"] = _inception("4b", 576, 192, 96, 128, 96, 128, _avg_pool(), 128)
    s["inception4c"] = _inception("4c", 576, 160, 128, 160, 128, 160, _avg_pool(), 128)
    s["inception4d"] = _inception("4d", 608, 96, 128, 192, 160, 192, _avg_pool(), 128)
    s["inception4e"] = _reduction("4e", 608, 128, 192, 192, 256)
    s["inception5a"] = _inception("5a", 1056, 352, 192, 320, 160, 224, _avg_pool(), 128)
    s["inception5b"] = _inception("5b", 1024, 352, 192, 320, 192, 224, _max_pool(1), 128)
    return s


@register("backbone", "bn_inception")
class BNInception(StagedBackbone):
    """BN-Inception (Inception-v2) as 14 named stages conv1 … inception5b (1024 ch, 7×7 at 224), Caffe names.

    Input convention of the Caffe weights: BGR, 0–255, minus (104, 117, 128), std 1.
    ``pretrained``: False, "imagenet" (``bn_inception-52deb4733.pth`` from Cadene's pretrainedmodels, in the
    torch.hub cache) or a file path. BN momentum is PyTorch's 0.1 (the Caffe port's 0.9 is a mistranslation
    of Caffe's moving-average fraction; it only matters when BN is not frozen).
    """

    def __init__(self, *, pretrained: str | bool = False, frozen_bn: bool = False):
        stages = _stages()
        data_config = DataConfig(
            input_size=224,
            resize_size=256,
            mean=(104.0, 117.0, 128.0),
            std=(1.0, 1.0, 1.0),
            channel_order="BGR",
            scale=255.0,
        )
        super().__init__(stages, _CHANNELS, data_config, reductions=_REDUCTIONS, frozen_bn=frozen_bn)
        load_pretrained(self, pretrained, IMAGENET_WEIGHTS, dict.fromkeys(stages, ""))
