"""Global pooling of a conv map [B, C, H, W] → [B, out_dim] (kind ``pooling``), METHODS.md §7.1 and §7.3.

avg / spoc (average), mac (max), gem (generalised mean, learnable p), rmac (regional MAC, cirtorch's
grid) and cgd (combination of multiple global descriptors with an auxiliary classification loss).
"""

from __future__ import annotations

import functools
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.errors import ConfigError
from harness.plugins import BenchVariant, set_param_options
from harness.registry import register
from harness.types import ModelOutput


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's L2 normalisation of the rows: x / (‖x‖ + eps)."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


@register("pooling", "avg")
@register("pooling", "spoc")
class AvgPool(nn.Module):
    """Global average pooling (SPoC; what most DML backbones end with)."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@register("pooling", "mac")
class MaxPool(nn.Module):
    """Global max pooling (MAC)."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return x.amax(dim=(2, 3))


@register("pooling", "gem", bench=[BenchVariant("GeM pooling", {"pooling": "gem"})])
class GeM(nn.Module):
    """Generalised-mean pooling: (mean_hw clamp(x, eps)^p)^(1/p), one shared p (p=1: SPoC, p→∞: MAC).

    With ``learn_p`` the exponent is a parameter carrying ``lr_mult = p_lr_mult`` (cirtorch: 10× the base
    learning rate) and ``no_weight_decay = True``, which the engine turns into a parameter group of its own.
    ``p_test``: the exponent used in eval mode instead of the trained p (MultiGrain tunes p at test
    time, e.g. trained at 3, evaluated at a larger p for larger images); None keeps the trained p.
    Computed in float32 (x^p overflows half precision under AMP).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        p: Annotated[float, Field(gt=0)] = 3.0,
        learn_p: bool = True,
        p_lr_mult: float = 10.0,
        p_test: Annotated[float, Field(gt=0)] | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.out_dim = in_channels
        self.eps = eps
        self.p_test = p_test
        self.p = nn.Parameter(torch.tensor([float(p)]), requires_grad=learn_p)
        set_param_options(self.p, lr_mult=p_lr_mult, no_weight_decay=True)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        p = self.p if self.training or self.p_test is None else torch.full_like(self.p, self.p_test)
        p = p.to(torch.promote_types(x.dtype, torch.float32))
        return x.to(p.dtype).clamp_min(self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


@functools.lru_cache(maxsize=64)
def rmac_regions(
    height: int, width: int, levels: int = 3, overlap: float = 0.4
) -> tuple[tuple[int, int, int], ...]:
    """The R-MAC regions of an H×W map as (top, left, side) squares (cirtorch's grid).

    Level l = 1..L has square regions of side ``floor(2·min(H, W)/(l + 1))``, l + extra of them along the
    longer side and l along the shorter one, evenly spaced from edge to edge. ``extra`` (0 for a square map)
    is the number of regions, among 2..7, whose step along the longer side best gives consecutive level-1
    regions the wanted ``overlap``, minus one. Start offsets are ``floor(k·(n_side − side)/(count − 1))``,
    computed exactly in integers. Regions of side 0 (tiny maps) are dropped.
    """
    short, long_ = min(height, width), max(height, width)
    extra = 0
    if long_ != short:
        steps = range(2, 8)
        errors = [abs((short**2 - short * (long_ - short) / (s - 1)) / short**2 - overlap) for s in steps]
        extra = errors.index(min(errors)) + 1
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = (2 * short) // (level + 1)
        if side == 0:
            continue
        tops = _starts(height, side, level + extra_h)
        lefts = _starts(width, side, level + extra_w)
        regions += [(t, left, side) for t in tops for left in lefts]
    return tuple(regions)


def _starts(size: int, side: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    return [(k * (size - side)) // (count - 1) for k in range(count)]


@register("pooling", "rmac", bench=[BenchVariant("R-MAC pooling", {"pooling": "rmac"})])
class RMAC(nn.Module):
    """Regional MAC (cirtorch ``rmac``): global MAC plus max-pooled regions on L levels, each L2-normalised,
    summed (the embedder's normalisation then L2-normalises the sum).

    Vectorised per level: one stride-1 max-pool with the level's region side gives every window's max,
    from which the region starts are picked. No regional PCA-whitening (cirtorch's ``Rpool`` option).
    """

    def __init__(self, *, in_channels: int, levels: Annotated[int, Field(ge=1)] = 3, eps: float = 1e-6):
        super().__init__()
        self.out_dim = in_channels
        self.levels = levels
        self.eps = eps

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = l2n(x.amax(dim=(2, 3)), self.eps)
        by_side: dict[int, list[tuple[int, int]]] = {}
        for top, left, side in rmac_regions(x.shape[2], x.shape[3], self.levels):
            by_side.setdefault(side, []).append((top, left))
        for side, starts in by_side.items():
            window_max = F.max_pool2d(x, kernel_size=side, stride=1)  # [B, C, H-side+1, W-side+1]
            tops, lefts = torch.tensor(starts, device=x.device).T
            regional = window_max[:, :, tops, lefts].transpose(1, 2)  # [B, R, C]
            out = out + l2n(regional, self.eps).sum(dim=1)
        return out


_DESCRIPTORS: dict[str, type[nn.Module]] = {"S": AvgPool, "M": MaxPool, "G": GeM}


@register("pooling", "cgd")
class CGD(nn.Module):
    """CGD: several global descriptors (S=SPoC, M=MAC, G=GeM), each → Linear (no bias) → L2, concatenated.

    ``descriptors`` is a string such as "SG", "MG" or "SMG"; each branch gets ``dim / n`` dimensions and the
    concatenation is L2-normalised (``out_dim = dim``). The FIRST descriptor also feeds an auxiliary
    classifier (BatchNorm → Linear(num_classes)) trained with cross-entropy on logits / ``temperature`` with
    label ``smoothing``; with labels (training) forward returns ``ModelOutput(embeddings, aux_losses=
    {"cgd_ce": weight·CE})``, without labels the plain [B, dim] tensor. GeM uses a fixed p = ``gem_p``
    (as the reference PyTorch reproduction). CGD is its own embedding head, so use it as::

        pooling: {name: cgd, descriptors: SG, dim: 1536}
        model: {name: embedder, head: false}
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        descriptors: str = "SG",
        dim: Annotated[int, Field(ge=1)] = 1536,
        gem_p: Annotated[float, Field(gt=0)] = 3.0,
        weight: Annotated[float, Field(ge=0)] = 1.0,
        smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        temperature: Annotated[float, Field(gt=0)] = 0.5,
    ):
        super().__init__()
        unknown = sorted(set(descriptors) - set(_DESCRIPTORS))
        if not descriptors or unknown or len(set(descriptors)) != len(descriptors):
            raise ConfigError(
                f"descriptors: {descriptors!r} must be distinct letters from S (SPoC), M (MAC), "
                "G (GeM), e.g. 'SG' or 'SMG'"
            )
        if dim % len(descriptors):
            raise ConfigError(f"dim: {dim} is not divisible by the {len(descriptors)} descriptors")
        extra = {"G": {"p": gem_p, "learn_p": False}}
        self.pools = nn.ModuleList(
            _DESCRIPTORS[d](in_channels=in_channels, **extra.get(d, {})) for d in descriptors
        )
        self.fcs = nn.ModuleList(
            nn.Linear(in_channels, dim // len(descriptors), bias=False) for _ in descriptors
        )
        self.classifier = nn.Sequential(nn.BatchNorm1d(in_channels), nn.Linear(in_channels, num_classes))
        self.out_dim = dim
        self.weight, self.smoothing, self.temperature = weight, smoothing, temperature

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | ModelOutput:
        pooled = [pool(x) for pool in self.pools]
        branches = [F.normalize(fc(g), dim=-1) for fc, g in zip(self.fcs, pooled, strict=True)]
        emb = F.normalize(torch.cat(branches, dim=-1), dim=-1)
        if labels is None:
            return emb
        logits = self.classifier(pooled[0]) / self.temperature
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.smoothing)
        return ModelOutput(embeddings=emb, aux_losses={"cgd_ce": self.weight * ce})
