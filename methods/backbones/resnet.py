"""ResNet-50 (torchvision) as stages stem, layer1 … layer4, optionally without the last downsampling (CGD)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import nn
from torchvision.models import ResNet50_Weights
from torchvision.models import resnet50 as torchvision_resnet50

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig
from methods.backbones.weights import WeightsFile, load_pretrained

_WEIGHTS = ResNet50_Weights.IMAGENET1K_V1
IMAGENET_WEIGHTS = WeightsFile(_WEIGHTS.url.rsplit("/", 1)[-1], _WEIGHTS.url)
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@register("backbone", "resnet50")
class ResNet50(StagedBackbone):
    """ResNet-50 (torchvision) as stages stem (conv1+bn+relu+maxpool), layer1 … layer4 (2048 ch).

    ``last_stride=1`` removes the downsampling of layer4 (14×14 final map at 224 input, as in CGD and
    re-id practice; CGD's unofficial PyTorch port removes layer3's instead, which gives the same final size).
    ``pretrained``: False, "imagenet" (torchvision's original IMAGENET1K_V1 weights that DML papers use,
    ``resnet50-0676ba61.pth`` in the torch.hub cache) or a file path (e.g. the V2 weights).
    """

    def __init__(
        self, *, pretrained: str | bool = False, last_stride: Literal[1, 2] = 2, frozen_bn: bool = False
    ):
        net = torchvision_resnet50(weights=None)
        if last_stride == 1:
            block = net.layer4[0]
            block.conv2.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        stages.update((name, getattr(net, name)) for name in _LAYERS)
        channels = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        reductions = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32 // (2 // last_stride)}
        data_config = DataConfig(input_size=224, resize_size=256)
        super().__init__(stages, channels, data_config, reductions=reductions, frozen_bn=frozen_bn)
        load_pretrained(self, pretrained, IMAGENET_WEIGHTS, {"stem": "", **{n: f"{n}." for n in _LAYERS}})
