"""Margin loss (Wu et al. 2017, "Sampling matters"), as MultiGrain (Berman et al. 2019) trains it.

Per triplet (a, p, n) with Euclidean distances: ``[D_ap − β + α]_+ + [β − D_an + α]_+`` summed over the
triplets and divided by the number of non-zero terms (MultiGrain ``modules/margin.py``, PML's
``DivisorReducer``), plus ``ν·β`` (Wu's β regularisation; 0 in MultiGrain and PML). β is learnable,
shared (MultiGrain) or one per class (Wu's official code, β of the anchor's class), initialised at 1.2,
and carries its own learning-rate multiplier. Triplets come from a miner (``distance_weighted`` in both
papers) or, without one, are all triplets of the batch. The distances are one [B, B] matrix; each of its
entries enters the sum weighted by the number of triplets that use it (``methods.miners.triplet_counts``),
so the cost does not grow with the number of triplets (B = 512, K = 4: ~780k).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import Reference, set_param_options
from harness.registry import register
from harness.types import LossOutput
from methods.distances import full_precision, label_masks, pairwise_distance
from methods.miners import triplet_counts


def _pml_references() -> list[Reference]:
    """PML's MarginLoss (margin 0.2, β 1.2 learnable, shared; all triplets), against our defaults."""
    from pytorch_metric_learning import losses

    return [Reference(lambda c, d: losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True))]


@register("loss", "margin", references=_pml_references)
class MarginLoss(nn.Module):
    """Margin loss (Wu et al. 2017): positives within β − α, negatives beyond β + α, learnable β.

    margin: α. beta: β's initial value. learn_beta: β is a parameter (else fixed). per_class_beta: one β
    per training class (Wu's official code) instead of one shared β (MultiGrain). beta_lr_mult: β's
    learning-rate multiplier (MultiGrain's ``beta_lr`` 1; β is exempt from weight decay). nu: weight of
    the ν·β regulariser. normalize: L2-normalise the embeddings first (both papers: the loss sees unit
    vectors). miner: a triplet miner (``distance_weighted`` as in the papers); without it all triplets.
    """

    accepts_miner: ClassVar[tuple[str, ...]] = ("triplets",)

    def __init__(
        self,
        *,
        margin: float = 0.2,
        beta: float = 1.2,
        learn_beta: bool = True,
        per_class_beta: bool = False,
        beta_lr_mult: float = 1.0,
        nu: float = 0.0,
        normalize: bool = True,
        num_classes: int,
        miner: nn.Module | None,
    ):
        super().__init__()
        self.margin, self.nu, self.normalize, self.miner = margin, nu, normalize, miner
        init = torch.full((num_classes if per_class_beta else 1,), float(beta))
        self.beta = nn.Parameter(init, requires_grad=learn_beta)
        set_param_options(self.beta, lr_mult=beta_lr_mult, no_weight_decay=True)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        pos, neg = label_masks(labels)
        triplets = None if self.miner is None else self.miner(embeddings, labels)
        # each triplet's two terms depend on one entry of the distance matrix each: sum every term once,
        # weighted by the number of triplets that use it (no per-triplet gather, O(B²) for any triplet count)
        n_ap, n_an = (n.to(embeddings.dtype) for n in triplet_counts(pos, neg, triplets))
        dist = pairwise_distance(embeddings, "euclidean")
        beta = (self.beta[labels] if len(self.beta) > 1 else self.beta)[:, None]  # the anchor's β
        pos_term = F.relu(dist - beta + self.margin) * n_ap
        neg_term = F.relu(beta - dist + self.margin) * n_an
        divisor = (n_ap * (pos_term > 0) + n_an * (neg_term > 0)).sum().clamp_min(1)
        value = (pos_term + neg_term).sum() / divisor
        count = n_ap.sum()
        if self.nu:
            reg = (beta.squeeze(1) * n_ap.sum(1)).sum() / divisor if len(self.beta) > 1 else self.beta[0]
            value = value + self.nu * reg
        with torch.no_grad():
            d = dist.detach()
            stats = {
                "triplets": count,
                "active_fraction": divisor / (2 * count).clamp_min(1),
                "beta": self.beta.mean(),
                "pos_dist": (d * n_ap).sum() / count.clamp_min(1),
                "neg_dist": (d * n_an).sum() / count.clamp_min(1),
            }
        return LossOutput(value, stats)
