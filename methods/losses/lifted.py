"""Lifted structured loss (Oh Song et al., CVPR 2016) and Hermans' generalised per-anchor variant.

Lifted structured, per positive pair (i, j) with Euclidean D (METHODS.md 3.4):
``J_ij = log(Σ_{k∈N_i} e^{α - D_ik} + Σ_{l∈N_j} e^{α - D_jl}) + D_ij``, loss ``= 1/(2|P̂|) Σ_{P̂} [J_ij]_+²``
over unordered positive pairs, computed as the mean of ``½[J_ij]_+²`` over ordered pairs (the same
value). The two sums only need one log-sum-exp per row: ``J_ij = logaddexp(r_i, r_j) + D_ij`` with
``r_i = log Σ_{k∈N_i} e^{α - D_ik}``, so the cost is O(B²), not O(pairs × negatives) as in PML's
LiftedStructureLoss (equal in value, with ``distance=LpDistance(normalize_embeddings=False)``).

Generalised lifted structure (Hermans et al. 2017, PML's GeneralizedLiftedStructureLoss), per anchor:
``[log Σ_{p∈P_a} e^{D_ap} + log Σ_{n∈N_a} e^{m - D_an}]_+``, mean over anchors that have both a positive
and a negative (PML averages over all anchors, an anchor without positives keeping its negative term).

With a synthesis (symmetrical synthesis), ``synthesis_rule`` says how it enters ``J_ij``:

* ``per_negative`` (lifted_structured's default; METHODS.md §4.3's reading of the paper): every negative
  term stays and each negative distance ``D_ik`` is replaced by its minimum over x_k and its synthetics
  (x_k reflected about each other member of its class). A distance can only shrink, so the loss is never
  below plain lifted on the same batch: the synthetics make it harder, as the paper means them to;
* ``per_pair`` (the named variant; generalized_lifted_structured's only rule): the negatives of both
  log-sum-exps are the same-class negative pairs (x_k, x_l), one term each at the distance of its hardest
  candidate of {x_k, x_l, x_k', x_l'} (a class with one image in the batch: that image). It drops terms
  (one per pair instead of one per image), so it can come out below plain lifted.

A synthesis that only scores points always works per negative.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.distances import (
    HardNegativeSource,
    PairNegativeSource,
    distance_matrix,
    full_precision,
    label_masks,
    masked_logsumexp,
    masked_mean,
    pair_negative_distances,
    pairwise_distance,
)
from methods.miners import positive_pairs


def _stats(
    dist: Tensor, pos: Tensor, neg_dist: Tensor, neg: Tensor, terms: Tensor, used: Tensor
) -> dict[str, Tensor]:
    """Fraction of non-zero terms among the used ones (float mask), mean positive / negative distance."""
    return {
        "active_fraction": torch.count_nonzero(terms.detach() * used) / used.sum().clamp_min(1),
        "pos_dist": masked_mean(dist.detach(), pos),
        "neg_dist": masked_mean(neg_dist.detach(), neg),
    }


class _LiftedBase(nn.Module):
    def __init__(
        self,
        margin: float,
        normalize: bool,
        synthesis: HardNegativeSource | None,
        synthesis_rule: Literal["per_negative", "per_pair"] = "per_pair",
    ):
        super().__init__()
        self.margin = margin
        self.normalize = normalize
        self.synthesis = synthesis
        self.synthesis_rule = synthesis_rule

    def distances(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``dist`` [B, B] and its positive mask, then the negatives: ``neg_dist`` [B, N] and their mask
        (the columns of ``dist``, or with a pair-scoring synthesis the batch's N same-class pairs)."""
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        pos, neg = label_masks(labels)
        if self.synthesis_rule == "per_pair" and isinstance(self.synthesis, PairNegativeSource):
            # one term per same-class negative pair, at its hardest candidate
            neg_dist, pair_labels = pair_negative_distances(embeddings, labels, "euclidean", self.synthesis)
            dist = pairwise_distance(embeddings, "euclidean")
            return dist, pos, neg_dist, labels[:, None] != pair_labels[None, :]
        dist = distance_matrix(embeddings, labels, "euclidean", self.synthesis)
        return dist, pos, dist, neg


def _pml_lifted() -> list[Reference]:
    """PML's LiftedStructureLoss (neg_margin 1, raw Euclidean); it materialises [pos pairs × neg pairs]."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import LpDistance

    def gib(b: int) -> float:
        return 6 * (b * 3) * (b * (b - 4)) * 4 / 2**30

    raw = LpDistance(normalize_embeddings=False)
    return [
        Reference(lambda c, d: losses.LiftedStructureLoss(neg_margin=1, pos_margin=0, distance=raw), gib=gib)
    ]


@register("loss", "lifted_structured", references=_pml_lifted)
class LiftedStructuredLoss(_LiftedBase):
    """Lifted structured loss (Oh Song et al. 2016): log-sum-exp over both ends' negatives per positive pair.

    margin: α in ``e^{α - D}``. normalize: L2-normalise the embeddings first (PML's default; the paper
    does not). synthesis: symmetrical synthesis or another hard-negative source. synthesis_rule:
    ``per_negative`` (default: each negative distance at its minimum over the original and its
    synthetics; never below plain lifted) or ``per_pair`` (one term per same-class negative pair at its
    hardest candidate; see the module docstring).
    """

    def __init__(
        self,
        *,
        margin: float = 1.0,
        normalize: bool = False,
        synthesis_rule: Literal["per_negative", "per_pair"] = "per_negative",
        synthesis: HardNegativeSource | None,
    ):
        super().__init__(margin, normalize, synthesis, synthesis_rule)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        dist, pos, neg_dist, neg = self.distances(embeddings, labels)
        row = masked_logsumexp(self.margin - neg_dist, neg)  # [B] log Σ_{k∈N_i} e^{α - D_ik}
        a, p = positive_pairs(pos, neg)  # ordered positive pairs (both ends then have negatives)
        terms = 0.5 * F.relu(torch.logaddexp(row[a], row[p]) + dist[a, p]).square()
        value = terms.sum() / max(len(a), 1)
        return LossOutput(value, _stats(dist, pos, neg_dist, neg, terms, torch.ones_like(terms)))


def _pml_generalized() -> list[Reference]:
    """PML's GeneralizedLiftedStructureLoss (neg_margin 1, raw Euclidean)."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import LpDistance

    raw = LpDistance(normalize_embeddings=False)
    return [
        Reference(
            lambda c, d: losses.GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0, distance=raw)
        )
    ]


@register("loss", "generalized_lifted_structured", references=_pml_generalized)
class GeneralizedLiftedStructuredLoss(_LiftedBase):
    """Generalised lifted structure (Hermans et al. 2017): softmax positive vs softmin negative per anchor.

    margin: m in ``e^{m - D_an}``. normalize: L2-normalise the embeddings first (PML's default).
    synthesis: as for ``lifted_structured``.
    """

    def __init__(self, *, margin: float = 1.0, normalize: bool = False, synthesis: HardNegativeSource | None):
        super().__init__(margin, normalize, synthesis)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        dist, pos, neg_dist, neg = self.distances(embeddings, labels)
        anchors = (pos.any(1) & neg.any(1)).to(dist.dtype)
        terms = F.relu(masked_logsumexp(dist, pos) + masked_logsumexp(self.margin - neg_dist, neg)) * anchors
        value = terms.sum() / anchors.sum().clamp_min(1)
        return LossOutput(value, _stats(dist, pos, neg_dist, neg, terms, anchors))
