"""GoogLeNet / Inception-v1 (torchvision) with the ABE paper's stage names (conv1 … pool3, inception4a …)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import GoogLeNet as TorchvisionGoogLeNet
from torchvision.models import GoogLeNet_Weights

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig
from methods.backbones.weights import WeightsFile, load_pretrained

#: stage name → torchvision child module name.
_STAGES = {
    "conv1": "conv1", "pool1": "maxpool1", "conv2": "conv2", "conv3": "conv3", "pool2": "maxpool2",
    "inception3a": "inception3a", "inception3b": "inception3b", "pool3": "maxpool3",
    "inception4a": "inception4a", "inception4b": "inception4b", "inception4c": "inception4c",
    "inception4d": "inception4d", "inception4e": "inception4e", "pool4": "maxpool4",
    "inception5a": "inception5a", "inception5b": "inception5b",
}  # fmt: skip
_CHANNELS = {
    "conv1": 64, "pool1": 64, "conv2": 64, "conv3": 192, "pool2": 192, "inception3a": 256, "inception3b": 480,
    "pool3": 480, "inception4a": 512, "inception4b": 512, "inception4c": 512, "inception4d": 528,
    "inception4e": 832, "pool4": 832, "inception5a": 832, "inception5b": 1024,
}  # fmt: skip
_REDUCTIONS = {
    "conv1": 2, "pool1": 4, "conv2": 4, "conv3": 4, "pool2": 8, "inception3a": 8, "inception3b": 8,
    "pool3": 16, "inception4a": 16, "inception4b": 16, "inception4c": 16, "inception4d": 16,
    "inception4e": 16, "pool4": 32, "inception5a": 32, "inception5b": 32,
}  # fmt: skip
_WEIGHTS = GoogLeNet_Weights.IMAGENET1K_V1
IMAGENET_WEIGHTS = WeightsFile(_WEIGHTS.url.rsplit("/", 1)[-1], _WEIGHTS.url)


@register("backbone", "googlenet")
class GoogLeNet(StagedBackbone):
    """GoogLeNet (Inception-v1, torchvision, with BN) as 16 stages conv1 … inception5b (1024 ch, 7×7 at 224).

    Input convention: RGB in [0, 1] normalised with mean = std = 0.5, which is exactly what torchvision's
    ``transform_input=True`` feeds its ImageNet weights (those weights were trained on that range); here
    ``transform_input`` is off and the data config does it, so no hidden re-normalisation happens inside.
    ``pretrained``: False, "imagenet" (``googlenet-1378be20.pth`` in the torch.hub cache) or a file path.
    """

    def __init__(self, *, pretrained: str | bool = False, frozen_bn: bool = False):
        net = TorchvisionGoogLeNet(aux_logits=False, transform_input=False, init_weights=pretrained is False)
        stages: OrderedDict[str, nn.Module] = OrderedDict((s, getattr(net, t)) for s, t in _STAGES.items())
        data_config = DataConfig(input_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        super().__init__(stages, _CHANNELS, data_config, reductions=_REDUCTIONS, frozen_bn=frozen_bn)
        load_pretrained(self, pretrained, IMAGENET_WEIGHTS, {s: f"{t}." for s, t in _STAGES.items()})
