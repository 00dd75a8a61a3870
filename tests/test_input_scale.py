"""Every recipe feeds a backbone exactly what its weights expect (issue #25, item 1): the per-channel mean
and std of what reaches the first convolution on a test image equal those of the weights' own
preprocessing, written here from the weights' documentation (not read back from the harness)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harness import registry
from harness.config import DataSection
from harness.data.batch_augment import BatchAugment
from harness.data.transforms import build_transforms, pil_steps

#: The preprocessing each backbone's pretrained weights were trained on, from a [H, W, 3] RGB uint8 image:
#: torchvision's GoogLeNet (``transform_input``: its ImageNet weights saw (x − 0.5) / 0.5 of x in [0, 1]),
#: the Caffe BN-Inception (BGR, 0–255, minus (104, 117, 128)), torchvision's ResNet (ImageNet mean / std).
WEIGHTS = {
    "googlenet": lambda x: (x / 255.0 - 0.5) / 0.5,
    "bn_inception": lambda x: x[..., ::-1] - np.array([104.0, 117.0, 128.0]),
    "resnet50": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
}
RECIPES = ("imagenet", "symm_official", "mdr_official", "abe_official")


def _photo() -> Image.Image:
    """A test image with distinct colour statistics in each channel."""
    y, x = np.mgrid[0:240, 0:300]
    rgb = np.stack([x * 255 / 299, y * 255 / 239, 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _first_conv_input(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the first convolution of ``backbone`` receives for input batch ``x``."""
    conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    seen: list[torch.Tensor] = []
    handle = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            backbone.eval()(x)
    finally:
        handle.remove()
    return seen[0][0]


def _stats(chw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = chw.double().flatten(1)
    return flat.mean(1), flat.std(1)


@pytest.fixture(scope="module")
def backbones() -> dict[str, nn.Module]:
    return {
        name: registry.build("backbone", name, context={"in_channels": 3}, pretrained=False)
        for name in WEIGHTS
    }


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_the_first_conv_sees_what_the_weights_were_trained_on(
    backbones: dict[str, nn.Module], name: str, recipe: str
) -> None:
    backbone = backbones[name]
    _, test = build_transforms(DataSection(transform=recipe), backbone.data_config, 3)
    img = _photo()
    seen = _first_conv_input(backbone, test(img)[None])
    pixels = np.asarray(pil_steps(test)(img), dtype=np.float64)  # the same crop, before any scaling
    want = torch.from_numpy(np.ascontiguousarray(WEIGHTS[name](pixels).transpose(2, 0, 1)))
    (mean, std), (want_mean, want_std) = _stats(seen), _stats(want)
    torch.testing.assert_close(mean, want_mean, atol=1e-3 * float(want_std.max()), rtol=0)
    torch.testing.assert_close(std, want_std, atol=0, rtol=1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_batched_augmentation_normalises_as_the_weights_expect(
    backbones: dict[str, nn.Module], name: str, recipe: str
) -> None:
    dc = backbones[name].data_config
    aug = BatchAugment(recipe, 32, 40, dc, 3, torch.device("cpu"), 0)
    pixels = np.asarray(_photo().resize((32, 32)), dtype=np.float64)
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float()[None]
    want = torch.from_numpy(np.ascontiguousarray(WEIGHTS[name](pixels).transpose(2, 0, 1)))
    (mean, std), (want_mean, want_std) = _stats(aug.normalise(x)[0]), _stats(want)
    torch.testing.assert_close(mean, want_mean, atol=1e-3 * float(want_std.max()), rtol=0)
    torch.testing.assert_close(std, want_std, atol=0, rtol=1e-4)
