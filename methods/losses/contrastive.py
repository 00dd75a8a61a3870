"""Contrastive loss (Hadsell, Chopra & LeCun 2006) in its classic and pytorch-metric-learning forms.

Per pair with Euclidean distance D: positives ``[D - pos_margin]_+``, negatives ``[neg_margin - D]_+``;
with ``squared`` each hinge becomes ``½·hinge²``. The positive-pair and negative-pair terms are
reduced separately (sum, mean, or mean over non-zero terms) and added.

* ``variant="paper"``: Hadsell's ``½·y·D² + ½·(1-y)·[m - D]_+²`` as cirtorch trains it: squared,
  summed, neg_margin 0.7 (cirtorch's default), embeddings used as given. Differences to cirtorch: the
  pairs are all ordered pairs of the batch (each unordered pair counted twice) rather than
  (query, positive, negatives) tuples, and D is ``sqrt(max(d², 1e-12))`` instead of ``|x - y + 1e-6|``.
* ``variant="pml"``: PML's ContrastiveLoss: plain hinges, AvgNonZero per term, neg_margin 1,
  L2-normalised embeddings.

``squared``, ``reduction``, ``neg_margin`` and ``normalize`` left at None take the variant's value. The
ABE-style form (margins on the Euclidean distance of unit vectors) is ``normalize=True`` with margins.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.distances import (
    HardNegativeSource,
    distance_matrix,
    full_precision,
    label_masks,
    pair_masks,
)

Reduction = Literal["sum", "mean", "mean_nonzero"]

#: (squared, reduction, neg_margin, normalize) of each variant.
_VARIANTS: dict[str, tuple[bool, Reduction, float, bool]] = {
    "paper": (True, "sum", 0.7, False),
    "pml": (False, "mean_nonzero", 1.0, True),
}


def reduce_pairs(losses: Tensor, keep: Tensor, reduction: Reduction) -> Tensor:
    """Sum / mean / mean over non-zero entries of ``losses`` (already zero outside the float mask keep)."""
    total = losses.sum()
    if reduction == "sum":
        return total
    count = torch.count_nonzero(losses) if reduction == "mean_nonzero" else keep.sum()
    return total / count.clamp_min(1)


def _pml_references() -> list[Reference]:
    """PML's ContrastiveLoss (its defaults), against our ``variant="pml"``."""
    from pytorch_metric_learning import losses

    return [Reference(lambda c, d: losses.ContrastiveLoss(), {"variant": "pml"}, variant="pml")]


@register("loss", "contrastive", references=_pml_references)
class ContrastiveLoss(nn.Module):
    """Contrastive loss: pull positives within pos_margin, push negatives beyond neg_margin.

    variant: "paper" (Hadsell / cirtorch: squared, summed, margin 0.7) or "pml" (PML: hinges,
        AvgNonZero, margin 1, normalised); None-valued options below take the variant's value.
    pos_margin, neg_margin: margins on the Euclidean distance.
    squared: use ``½·hinge²`` instead of the hinge.
    reduction: per term (positive pairs, negative pairs) "sum", "mean" or "mean_nonzero".
    normalize: L2-normalise the embeddings first.
    miner: a pair miner whose pairs replace all pairs of the batch.
    synthesis: negative distances are the smallest over the synthetics (symmetrical synthesis).
    """

    accepts_miner: ClassVar[tuple[str, ...]] = ("pairs",)

    def __init__(
        self,
        *,
        variant: Literal["paper", "pml"] = "paper",
        pos_margin: float = 0.0,
        neg_margin: float | None = None,
        squared: bool | None = None,
        reduction: Reduction | None = None,
        normalize: bool | None = None,
        miner: nn.Module | None,
        synthesis: HardNegativeSource | None,
    ):
        super().__init__()
        v_squared, v_reduction, v_margin, v_normalize = _VARIANTS[variant]
        self.variant = variant
        self.pos_margin = pos_margin
        self.neg_margin = v_margin if neg_margin is None else neg_margin
        self.squared = v_squared if squared is None else squared
        self.reduction: Reduction = v_reduction if reduction is None else reduction
        self.normalize = v_normalize if normalize is None else normalize
        self.miner = miner
        self.synthesis = synthesis

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        dist = distance_matrix(embeddings, labels, "euclidean", self.synthesis)
        if self.miner is None:
            pos, neg = label_masks(labels)
        else:
            with torch.no_grad():
                pos, neg = pair_masks(self.miner(embeddings, labels), len(labels), labels.device)
        pos, neg = pos.to(dist.dtype), neg.to(dist.dtype)
        pos_loss = F.relu(dist - self.pos_margin) * pos
        neg_loss = F.relu(self.neg_margin - dist) * neg
        if self.squared:
            pos_loss, neg_loss = 0.5 * pos_loss.square(), 0.5 * neg_loss.square()
        value = reduce_pairs(pos_loss, pos, self.reduction) + reduce_pairs(neg_loss, neg, self.reduction)
        d = dist.detach()
        n_pos, n_neg = pos.sum(), neg.sum()
        return LossOutput(
            value,
            {
                "pos_pairs": n_pos,
                "neg_active_fraction": torch.count_nonzero(neg_loss.detach()) / n_neg.clamp_min(1),
                "pos_dist": (d * pos).sum() / n_pos.clamp_min(1),
                "neg_dist": (d * neg).sum() / n_neg.clamp_min(1),
            },
        )
