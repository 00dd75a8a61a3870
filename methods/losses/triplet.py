"""Triplet loss with batch-all, batch-hard, FaceNet semi-hard and random mining (or an external miner).

Per triplet ``ℓ(a, p, n) = [D_ap - D_an + margin]_+`` or, with ``soft``, ``softplus(D_ap - D_an)``
(Hermans' soft margin: no margin). Mining (METHODS.md 3.2):

* ``all`` — every valid triplet (Hermans' batch-all); default reduction: mean over the active
  (ℓ > 0) triplets ("BA≠0"), ``reduction="mean"`` averages over all valid triplets ("BA"). Computed as a
  [positive pairs × B] matrix, never a B×B×B tensor.
* ``batch_hard`` — per anchor the furthest positive and the closest negative; mean over anchors.
* ``semi_hard`` — per positive pair the closest negative farther than the positive, else the farthest
  negative (TF ``triplet_semihard_loss``, which uses squared distances: ``distance="sqeuclidean"``);
  mean over positive pairs. Not PML's TripletMarginMiner("semihard"), see methods/miners.py.
* ``random`` — per positive pair one uniformly drawn negative; mean over positive pairs.

With an external miner the loss is the mean over the mined triplets (``reduction="auto"``): MDR's
metric loss is ``triplet`` (margin 0.2) + miner ``distance_weighted`` (F.triplet_margin_loss adds 1e-6
inside the norm; here the squared distance is clamped at 1e-12 instead). Every mode computes the [B, B]
distance matrix once and indexes it with the selected triplets (never two gathered D-dim rows per triplet).

Anchors without a positive or a negative in the batch take no part. PML equivalents: batch-all =
``TripletMarginLoss`` (AvgNonZero reducer = ``mean_nonzero``); batch-hard = ``BatchHardMiner`` +
``TripletMarginLoss(reducer=MeanReducer())`` (PML's default AvgNonZero averages over active anchors
only, which ``reduction="mean_nonzero"`` reproduces); soft = ``smooth_loss=True, margin=0``; PML
normalises embeddings by default (``normalize=True`` here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.distances import (
    Distance,
    HardNegativeSource,
    PairNegativeSource,
    distance_matrix,
    full_precision,
    label_masks,
    pair_negative_distances,
    pairwise_distance,
)
from methods.miners import (
    Triplets,
    batch_hard_triplets,
    positive_pairs,
    random_triplets,
    semi_hard_pair_negatives,
    semi_hard_triplets,
)

Mining = Literal["all", "batch_hard", "semi_hard", "random"]

#: Built-in selections from (distances, positive mask, negative mask) to (a, p, n).
_SELECT = {"batch_hard": batch_hard_triplets, "semi_hard": semi_hard_triplets}


def _pml_references() -> list[Reference]:
    """PML's TripletMarginLoss on raw Euclidean distances per mining mode (semi-hard: other semantics)."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.reducers import MeanReducer

    def raw() -> LpDistance:
        return LpDistance(normalize_embeddings=False)

    def mined(miner: Any) -> Callable[[Tensor, Tensor], Tensor]:
        loss = losses.TripletMarginLoss(margin=0.2, reducer=MeanReducer(), distance=raw())
        return lambda e, y: loss(e, y, miner(e, y))

    semihard = {"margin": 0.2, "type_of_triplets": "semihard"}
    return [
        Reference(lambda c, d: losses.TripletMarginLoss(margin=0.2, distance=raw()), {"mining": "all"},
                  variant="batch_all", target=0.7),
        Reference(lambda c, d: mined(miners.BatchHardMiner(distance=raw())), {"mining": "batch_hard"},
                  variant="batch_hard"),
        Reference(lambda c, d: mined(miners.TripletMarginMiner(**semihard, distance=raw())),
                  {"mining": "semi_hard"}, variant="semi_hard", note="PML semihard miner: other semantics"),
    ]  # fmt: skip


@register("loss", "triplet", references=_pml_references)
class TripletLoss(nn.Module):
    """Triplet loss (hinge or soft margin) with batch-all / batch-hard / semi-hard / random mining.

    margin: the hinge margin (ignored with ``soft``). soft: ``softplus(D_ap - D_an)`` (Hermans).
    mining: the built-in triplet selection; an external ``miner`` (producing triplets) replaces it
        (setting both is a config error).
    distance: euclidean (Hermans, MDR), sqeuclidean (FaceNet/TF), cosine (``1 - cos``).
    reduction: "auto" = mean over active triplets for ``all``, mean over all selected triplets otherwise;
        "mean" / "mean_nonzero" force one of the two.
    normalize: L2-normalise the embeddings first (FaceNet; PML's default).
    synthesis: negatives are the hardest over their synthetics (symmetrical synthesis). With a synthesis
        that scores negative pairs (Symm's rule): ``all`` makes one term per (anchor, positive, negative
        pair) with the pair's hardest candidate of {x_k, x_l, x_k', x_l'}; ``semi_hard`` represents each
        negative pair by its closest candidate farther than the positive (else its hardest) and applies
        the semi-hard choice to those. Batch-hard takes the hardest candidate of all, the same either way.
    """

    accepts_miner: ClassVar[tuple[str, ...]] = ("triplets",)

    def __init__(
        self,
        *,
        margin: float = 0.2,
        soft: bool = False,
        mining: Mining = "batch_hard",
        distance: Distance = "euclidean",
        reduction: Literal["auto", "mean", "mean_nonzero"] = "auto",
        normalize: bool = False,
        miner: nn.Module | None,
        synthesis: HardNegativeSource | None,
    ):
        super().__init__()
        if miner is not None and mining != "batch_hard":
            problem = (
                f"loss.mining: {mining!r} and the miner both choose the triplets; with a miner leave it out"
            )
            raise ConfigError([problem])
        self.margin = margin
        self.soft = soft
        self.mining = mining
        self.distance = distance
        self.reduction = reduction
        self.normalize = normalize
        self.miner = miner
        self.synthesis = synthesis

    def violation(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        """Per-triplet loss from anchor-positive and anchor-negative distances (broadcasting)."""
        diff = d_ap - d_an
        return F.softplus(diff) if self.soft else F.relu(diff + self.margin)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        pos, neg = label_masks(labels)
        batch_all = self.miner is None and self.mining == "all"
        # Symm's pair rule (methods/synthesis.py): batch-all makes one term per (anchor, positive, negative
        # pair) with the pair's hardest candidate; semi-hard chooses among the negative pairs' candidates
        pair_rule = (
            self.miner is None
            and self.mining in ("all", "semi_hard")
            and isinstance(self.synthesis, PairNegativeSource)
        )
        # the [B, B] matrix, computed once: it ranks the triplets and the selected ones index it (cheaper
        # than gathering two D-dim rows per triplet, even for one triplet per anchor)
        if pair_rule:
            dist = pairwise_distance(embeddings, self.distance)
        else:
            dist = distance_matrix(embeddings, labels, self.distance, self.synthesis)
        if batch_all:
            a, p = positive_pairs(pos, neg)
            neg_dist, neg_valid = dist, neg
            if pair_rule:
                neg_dist, pair_labels = pair_negative_distances(
                    embeddings, labels, self.distance, self.synthesis
                )
                neg_valid = labels[:, None] != pair_labels[None, :]
            d_ap, d_an = dist[a, p][:, None], neg_dist[a]  # [pairs, 1], [pairs, B or negative pairs]
            valid = neg_valid.to(dist.dtype)[a]
            losses = self.violation(d_ap, d_an) * valid
        else:
            if pair_rule:  # semi-hard: per positive pair one candidate of one negative pair
                a, p = positive_pairs(pos, neg)
                cand, pair_labels = pair_negative_distances(
                    embeddings, labels, self.distance, self.synthesis, hardest=False
                )  # [B, Q, 4]
                negs = labels[:, None] != pair_labels[None, :]
                q, c = semi_hard_pair_negatives(dist.detach(), cand.detach(), negs, a, p)
                d_ap, d_an = dist[a, p], cand[a, q, c]
            else:
                a, p, n = self.select(embeddings, labels, pos, neg, dist)
                d_ap, d_an = dist[a, p], dist[a, n]
            valid = torch.ones_like(d_an)
            losses = self.violation(d_ap, d_an)
        count, active = valid.sum(), torch.count_nonzero(losses)
        nonzero = self.reduction == "mean_nonzero" or (self.reduction == "auto" and batch_all)
        value = losses.sum() / (active if nonzero else count).clamp_min(1)
        return LossOutput(
            value,
            {
                "triplets": count.detach(),
                "active_fraction": active / count.detach().clamp_min(1),
                "pos_dist": d_ap.detach().mean() if d_ap.numel() else torch.zeros(()),
                "neg_dist": (d_an.detach() * valid).sum() / count.detach().clamp_min(1),
            },
        )

    @torch.no_grad()
    def select(self, embeddings: Tensor, labels: Tensor, pos: Tensor, neg: Tensor, dist: Tensor) -> Triplets:
        """The triplets (a, p, n) of the external miner, else of the built-in mining."""
        if self.miner is not None:
            return self.miner(embeddings, labels)
        if self.mining == "random":
            return random_triplets(pos, neg)
        return _SELECT[self.mining](dist.detach(), pos, neg)
