"""Multi-Similarity loss (Wang et al., CVPR 2019) with its own pair mining (METHODS.md 3.6).

On cosine similarities S, per anchor i with mined positives P̃_i and negatives Ñ_i (see
``methods.miners.multi_similarity_masks``, margin ε):
``L_i = (1/α)·log(1 + Σ_{P̃_i} e^{-α(S_ij - λ)}) + (1/β)·log(1 + Σ_{Ñ_i} e^{β(S_ik - λ)})``,
loss = ``Σ_i L_i / B`` (B = whole batch).

variant "official" (MalongTech code): self-pairs are removed by dropping positive similarities
``>= 1 - 1e-5`` (so exact duplicates are dropped too) and an anchor whose mined positives or negatives
are empty contributes 0. variant "pml" (PML's MultiSimilarityMiner + MultiSimilarityLoss): the diagonal
is removed and such an anchor keeps the term of its non-empty side. β defaults to the paper's 50 (the
official config's ``SCALE_NEG`` is 40).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.distances import (
    HardNegativeSource,
    full_precision,
    masked_logsumexp,
    masked_mean,
    pair_masks,
    similarity_matrix,
)
from methods.miners import multi_similarity_masks

#: The official code's self-pair test: a positive similarity this close to 1 is the image itself.
_SELF_SIMILARITY = 1 - 1e-5


def _pml_references() -> list[Reference]:
    """PML's MultiSimilarityLoss with its MultiSimilarityMiner (our built-in mining), same constants."""
    from pytorch_metric_learning import losses, miners

    def build(c: int, d: int) -> Callable[[Tensor, Tensor], Tensor]:
        loss, miner = (
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        )
        return lambda e, y: loss(e, y, miner(e, y))

    return [Reference(build, target=0.7)]


@register("loss", "multi_similarity", references=_pml_references)
class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss with MS pair mining (Wang et al. 2019).

    alpha, beta: positive / negative scales; base: the similarity offset λ; epsilon: the mining margin.
    variant: "official" or "pml" (self-pair removal, anchors with an empty mined side; module docstring).
    miner: a pair miner whose pairs replace the built-in mining.
    synthesis: negative similarities are the largest over the synthetics (symmetrical synthesis).
    """

    accepts_miner: ClassVar[tuple[str, ...]] = ("pairs",)

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        variant: Literal["official", "pml"] = "official",
        miner: nn.Module | None,
        synthesis: HardNegativeSource | None,
    ):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon
        self.variant = variant
        self.miner = miner
        self.synthesis = synthesis

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        sim = similarity_matrix(embeddings, labels, self.synthesis)
        if self.miner is not None:
            with torch.no_grad():
                pos, neg = pair_masks(self.miner(embeddings, labels), len(labels), labels.device)
        else:
            same = labels[:, None] == labels[None, :]
            if self.variant == "official":
                pos = same & (sim.detach() < _SELF_SIMILARITY)
            else:
                pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pos, neg = multi_similarity_masks(sim.detach(), pos, ~same, self.epsilon)
        pos_loss = masked_logsumexp((self.base - sim) * self.alpha, pos, add_one=True) / self.alpha
        neg_loss = masked_logsumexp((sim - self.base) * self.beta, neg, add_one=True) / self.beta
        per_anchor = pos_loss + neg_loss
        if self.variant == "official":  # an anchor with an empty mined side contributes nothing
            per_anchor = per_anchor * (pos.any(1) & neg.any(1)).to(per_anchor.dtype)
        s = sim.detach()
        return LossOutput(
            per_anchor.sum() / max(len(labels), 1),
            {
                "pos_pairs": pos.sum().float(),
                "neg_pairs": neg.sum().float(),
                "pos_sim": masked_mean(s, pos),
                "neg_sim": masked_mean(s, neg),
            },
        )
