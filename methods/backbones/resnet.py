"""ResNet-18/34/50 (torchvision) as stages stem, layer1 … layer4, optionally without the last downsampling."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import nn
from torchvision.models import (
    ResNet,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    resnet18,
    resnet34,
    resnet50,
)
from torchvision.models._api import WeightsEnum

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig
from methods.backbones.weights import WeightsFile, load_pretrained

_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _weights_file(weights: WeightsEnum) -> WeightsFile:
    return WeightsFile(weights.url.rsplit("/", 1)[-1], weights.url)


#: The original (V1) ImageNet weights that DML papers use, e.g. ``resnet50-0676ba61.pth``.
IMAGENET_WEIGHTS = _weights_file(ResNet50_Weights.IMAGENET1K_V1)


class _StagedResNet(StagedBackbone):
    """A torchvision ResNet as stages stem (conv1+bn+relu+maxpool), layer1 … layer4.

    ``last_stride=1`` removes the downsampling of layer4 (final map 14×14 at 224 input, as in CGD and
    re-id practice). ``pretrained``: False, "imagenet" (torchvision's IMAGENET1K_V1 file in the torch.hub
    cache) or a file path. Subclasses name the torchvision constructor, its V1 weights and the stage widths.
    """

    def __init__(
        self,
        net: ResNet,
        widths: tuple[int, int, int, int],
        weights: WeightsFile,
        *,
        pretrained: str | bool,
        last_stride: Literal[1, 2],
        frozen_bn: bool,
    ):
        if last_stride == 1:
            block = net.layer4[0]
            strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck / BasicBlock
            strided.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        stages.update((name, getattr(net, name)) for name in _LAYERS)
        channels = {"stem": 64, **dict(zip(_LAYERS, widths, strict=True))}
        reductions = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32 // (2 // last_stride)}
        data_config = DataConfig(input_size=224, resize_size=256)
        super().__init__(stages, channels, data_config, reductions=reductions, frozen_bn=frozen_bn)
        load_pretrained(self, pretrained, weights, {"stem": "", **{n: f"{n}." for n in _LAYERS}})


@register("backbone", "resnet50")
class ResNet50(_StagedResNet):
    """ResNet-50 (torchvision) as stages stem, layer1 … layer4 (2048 ch); ImageNet file resnet50-0676ba61.pth.

    ``last_stride=1`` removes layer4's downsampling (CGD; CGD's unofficial port removes layer3's instead,
    same final size). ``pretrained``: False, "imagenet" or a weights file path (e.g. the V2 weights).
    """

    def __init__(
        self, *, pretrained: str | bool = False, last_stride: Literal[1, 2] = 2, frozen_bn: bool = False
    ):
        super().__init__(
            resnet50(weights=None), (256, 512, 1024, 2048), IMAGENET_WEIGHTS,
            pretrained=pretrained, last_stride=last_stride, frozen_bn=frozen_bn,
        )  # fmt: skip


@register("backbone", "resnet34")
class ResNet34(_StagedResNet):
    """ResNet-34 (torchvision) as stages stem, layer1 … layer4 (512 ch); ImageNet resnet34-b627a593.pth."""

    def __init__(
        self, *, pretrained: str | bool = False, last_stride: Literal[1, 2] = 2, frozen_bn: bool = False
    ):
        super().__init__(
            resnet34(weights=None), (64, 128, 256, 512), _weights_file(ResNet34_Weights.IMAGENET1K_V1),
            pretrained=pretrained, last_stride=last_stride, frozen_bn=frozen_bn,
        )  # fmt: skip


@register("backbone", "resnet18")
class ResNet18(_StagedResNet):
    """ResNet-18 (torchvision) as stages stem, layer1 … layer4 (512 ch); ImageNet resnet18-f37072fd.pth."""

    def __init__(
        self, *, pretrained: str | bool = False, last_stride: Literal[1, 2] = 2, frozen_bn: bool = False
    ):
        super().__init__(
            resnet18(weights=None), (64, 128, 256, 512), _weights_file(ResNet18_Weights.IMAGENET1K_V1),
            pretrained=pretrained, last_stride=last_stride, frozen_bn=frozen_bn,
        )  # fmt: skip
