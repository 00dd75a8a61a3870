"""MDR: multi-level distance regularization (Kim & Park, AAAI 2021), METHODS.md §6.

MDR normalises the batch's pairwise Euclidean distances with running statistics and pulls every
normalised distance towards the nearest of K learnable levels (L1), so distances settle on a few
"degrees of similarity" and the metric loss can neither ignore easy pairs nor over-weight hard ones.
It is meant for un-normalised embeddings scaled by the batch mean distance (MDR §6.1)::

    model: {name: embedder, normalize: mean_distance}
    loss: {name: triplet, margin: 0.2}
    miner: distance_weighted
    regularizers: [{name: mdr, levels: [-3, 0, 3], weight: 0.6, level_l2: 0.01, momentum: 0.9}]
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from harness.plugins import BenchVariant
from harness.registry import register
from harness.types import LossOutput
from methods.distances import full_precision

#: The histogram of normalised distances in ``epoch_diagnostics`` has fixed bins over
#: [-HIST_RANGE, HIST_RANGE]; values outside are counted in the end bins.
HIST_RANGE = 6.0
HIST_BINS = 48


def pairwise_euclidean(e: torch.Tensor) -> torch.Tensor:
    """[B, B] Euclidean distances as the official ``pdist``: squared distances clamped at 1e-12, square
    root, diagonal forced to 0 (so the diagonal has a zero, finite gradient)."""
    prod = e @ e.T
    sq = prod.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * prod).clamp_min(1e-12).sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


#: ``dmlh bench methods``: MDR as it is meant to be used, on the mean-distance-scaled embedder.
_BENCH = [
    BenchVariant(
        "+ MDR (mean_distance head)", {"model": {"normalize": "mean_distance"}, "regularizers": ["mdr"]}
    )
]


@register("regularizer", "mdr", bench=_BENCH)
class MDR(nn.Module):
    """Multi-level distance regularization: pull normalised pairwise distances to K learnable levels.

    Per batch (METHODS.md 6.2): D = pairwise Euclidean distances; batch mean / unbiased std of D,
    detached, over all B² entries including the B diagonal zeros (``stats_diagonal="include"``, the
    official behaviour) or over the B(B−1) off-diagonal entries only (``"exclude"``); running statistics
    μ̂, σ̂ (the first training call copies the batch statistics, later calls blend them with
    ``momentum``: μ̂ ← momentum·μ̂ + (1 − momentum)·μ_b); d̂_ij = (D_ij − μ̂)/σ̂ for i ≠ j;
    L_MDR = mean over ordered pairs i ≠ j of min_k |d̂_ij − s_k|.

    The returned value is ``weight · L_MDR + level_l2 · Σ_k s_k²`` (the official objective's λ and ν
    terms; the metric loss is added by the engine). Levels start at ``levels`` (any K ≥ 1, in units of σ̂
    around μ̂) and are learned with the loss parameter group.

    Running statistics update only in training mode; eval mode uses them as they are (or the batch's
    own statistics before the first training call). Unlike the official code, μ̂, σ̂ and the
    ``initialized`` flag are buffers, so a checkpoint restores them instead of re-initialising on resume.
    σ̂ is clamped at 1e-12 (all distances equal would otherwise divide by zero). Under AMP the term is
    computed in float32 (half-precision embeddings are upcast, autocast is off inside).

    ``epoch_diagnostics()``: the levels, a histogram of the normalised distances of the epoch's training
    batches (``HIST_BINS`` fixed bins over ±``HIST_RANGE``) and how many pairs each level was the nearest
    to; the accumulators reset after each call.
    """

    def __init__(
        self,
        *,
        levels: Annotated[tuple[float, ...], Field(min_length=1)] = (-3.0, 0.0, 3.0),
        weight: Annotated[float, Field(ge=0)] = 0.6,
        level_l2: Annotated[float, Field(ge=0)] = 0.01,
        momentum: Annotated[float, Field(ge=0, le=1)] = 0.9,
        stats_diagonal: Literal["include", "exclude"] = "include",
    ):
        super().__init__()
        self.levels = nn.Parameter(torch.tensor([float(s) for s in levels]))
        self.weight = weight
        self.level_l2 = level_l2
        self.momentum = momentum
        self.stats_diagonal = stats_diagonal
        self.register_buffer("running_mean", torch.tensor(0.0))
        self.register_buffer("running_std", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("_hist", torch.zeros(HIST_BINS), persistent=False)
        self.register_buffer("_level_counts", torch.zeros(len(levels)), persistent=False)

    def batch_stats(self, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached mean and unbiased std of the distance matrix (diagonal per ``stats_diagonal``)."""
        d = dist.detach()
        values = (
            d.reshape(-1)
            if self.stats_diagonal == "include"
            else d[~torch.eye(len(d), dtype=torch.bool, device=d.device)]
        )
        return values.mean(), values.std()

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """First call: copy the batch statistics; later: blend with ``momentum`` (no host sync)."""
        for running, value in ((self.running_mean, mean), (self.running_std, std)):
            blended = self.momentum * running + (1 - self.momentum) * value
            running.copy_(torch.where(self.initialized, blended, value))
        self.initialized.fill_(True)

    @full_precision
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> LossOutput:
        """The MDR term in float32 with autocast off, whatever precision the model ran in (the official code
        runs in fp32; bf16 distances lose the small differences the normalisation by σ̂ magnifies)."""
        levels = self.levels.to(embeddings.dtype)
        penalty = self.level_l2 * levels.pow(2).sum()
        b = len(embeddings)
        if b < 2:  # no pair: only the level penalty
            return LossOutput(penalty, {"mdr": 0.0, "level_penalty": penalty.detach()})
        dist = pairwise_euclidean(embeddings)
        batch_mean, batch_std = self.batch_stats(dist)
        if self.training:
            self._update_running(batch_mean, batch_std)
        # eval mode before any training batch: the batch's own statistics
        mean = torch.where(self.initialized, self.running_mean.to(dist.dtype), batch_mean)
        std = torch.where(self.initialized, self.running_std.to(dist.dtype), batch_std)
        off = ~torch.eye(b, dtype=torch.bool, device=dist.device)
        normalised = (dist[off] - mean) / std.clamp_min(1e-12)
        gap, nearest = (normalised[:, None] - levels[None, :]).abs().min(dim=1)
        mdr = gap.mean()
        if self.training:
            self._accumulate(normalised.detach(), nearest)
        stats = {
            "mdr": mdr.detach(),
            "level_penalty": penalty.detach(),
            "running_mean": self.running_mean.clone(),
            "running_std": self.running_std.clone(),
        }
        return LossOutput(self.weight * mdr + penalty, stats)

    @torch.no_grad()
    def _accumulate(self, normalised: torch.Tensor, nearest: torch.Tensor) -> None:
        clipped = normalised.float().clamp(-HIST_RANGE, HIST_RANGE)
        self._hist += torch.histc(clipped, bins=HIST_BINS, min=-HIST_RANGE, max=HIST_RANGE)
        self._level_counts += torch.bincount(nearest, minlength=len(self._level_counts)).float()

    def epoch_diagnostics(self) -> dict[str, Any]:
        """Levels, normalised-distance histogram and pairs per level of this epoch; resets the counts."""
        edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
        levels, pairs = self.levels.detach().cpu().tolist(), self._level_counts.cpu()
        shares = (pairs / pairs.sum().clamp_min(1)).tolist()
        out: dict[str, Any] = {
            # scalars (history columns, plotted per epoch): each level's value and share of the pairs
            **{f"mdr_level_{i}": v for i, v in enumerate(levels)},
            **{f"mdr_level_{i}_pair_share": v for i, v in enumerate(shares)},
            "mdr_levels": levels,
            "mdr_hist_edges": edges.tolist(),
            "mdr_hist_counts": self._hist.cpu().long().tolist(),
            "mdr_level_pairs": pairs.long().tolist(),
            "mdr_running_mean": float(self.running_mean),
            "mdr_running_std": float(self.running_std),
        }
        self._hist.zero_()
        self._level_counts.zero_()
        return out
