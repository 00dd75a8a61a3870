"""small_convnet scales depth and downsampling with input_size: its receptive field covers the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import registry
from harness.model import StagedBackbone
from methods.backbones.small_convnet import auto_downsampling


def build(**params: object) -> StagedBackbone:
    return registry.build("backbone", "small_convnet", context={"in_channels": 1}, path="backbone", **params)


@pytest.mark.parametrize(
    ("size", "final", "reductions"),
    [(8, 2, [1, 2, 4, 4]), (28, 7, [1, 2, 4, 4]), (64, 8, [2, 4, 8, 8]), (96, 6, [2, 4, 8, 16, 16])],
)
def test_final_map_and_reductions_follow_the_input_size(size: int, final: int, reductions: list[int]) -> None:
    backbone = build(input_size=size).eval()
    assert [s.reduction for s in backbone.feature_info] == reductions
    with torch.no_grad():
        assert backbone(torch.randn(1, 1, size, size)).shape[2:] == (final, final)
    assert auto_downsampling(size) == int(np.log2(reductions[-1]))


def test_28_px_keeps_the_classic_four_block_net() -> None:
    """The digits / Fashion-MNIST studies at 28 px and 8 px build the same network as before the change."""
    backbone = build(input_size=28)
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 32, (1, 1)), (32, 64, (1, 1)), (64, 128, (1, 1)), (128, 256, (1, 1)),
    ]  # fmt: skip
    assert sum(p.numel() for p in backbone.parameters()) == 388_320
    assert build(input_size=8).stage_channels == backbone.stage_channels


def receptive_field(backbone: StagedBackbone, size: int) -> int:
    """Width of the input region that the centre output unit depends on (non-zero input gradient)."""
    x = torch.randn(1, 1, size, size, requires_grad=True)
    out = backbone.eval()(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    cols = (x.grad[0, 0].abs().sum(0) > 0).nonzero()  # type: ignore[union-attr]
    return int(cols.max() - cols.min() + 1)


def test_receptive_field_covers_a_64_px_image() -> None:
    assert receptive_field(build(input_size=64), 64) >= 63  # the whole image but the stem's padded edge
    assert receptive_field(build(input_size=64, downsampling=2, convs_per_block=1), 64) == 20
