"""Global pooling of a conv map [B, C, H, W] → [B, C] (kind ``pooling``)."""

from __future__ import annotations

import torch
from torch import nn

from harness.registry import register


@register("pooling", "avg")
class AvgPool(nn.Module):
    """Global average pooling (what most DML backbones end with)."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return x.mean(dim=(2, 3))
