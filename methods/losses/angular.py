"""Angular loss (Wang et al., ICCV 2017), N-pair form, as in the Symmetrical Synthesis code."""

from __future__ import annotations

import math

from torch import Tensor

from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.losses.npair import PairSoftmaxLoss
from methods.synthesis import SymmetricalSynthesis


def _pml_references() -> list[Reference]:
    """PML's AngularLoss, alpha 45°."""
    from pytorch_metric_learning import losses

    return [Reference(lambda c, d: losses.AngularLoss(alpha=45))]


@register("loss", "angular", references=_pml_references)
class AngularLoss(PairSoftmaxLoss):
    """Angular loss (Wang et al. 2017), N-pair form: softmax CE over angular logits of the pairs.

    For pairs (a_i, p_i) (the first two images of each class) the logit matrix f(A, P) has diagonal
    ``2(1+tan²α)·a_iᵀp_i`` and off-diagonal ``4tan²α·(a_i+p_i)ᵀp_j``; the loss is the mean over anchors
    of ``log(1 + Σ_{j≠i} exp(f_ij − f_ii))`` (softmax cross-entropy) plus
    ``l2_reg·0.25·(mean‖a‖² + mean‖p‖²)`` on the raw embeddings.

    alpha: in degrees; 45 is the Symm code's default (PML's default is 40).
    normalize: L2-normalise a and p first (Symm: off, ``angular_l2norm=False``; PML: required).
    l2_reg: 0.002 as in the Symm code (``l2_reg=True``).
    with_npair: add the N-pair logits A·Pᵀ (Symm's ``with_npair``; with synthesis they are added after
        the max, which the official code does not do).
    weight: the loss (cross-entropy and l2_reg term) times this; the official Symm code weights the angular
        loss by ``w_angular = 2`` in its total loss, which matters beside an L2 weight decay (it is no
        constant gradient scale then, even under Adam).
    With symmetrical synthesis (official Symm+Angular): element-wise max of f(X, Y) over the 12
    ordered pairings of distinct sets among (A, P, S1, S2).

    Differences: pytorch-metric-learning's AngularLoss uses every
    positive pair of the batch as (anchor, positive) and every other-class image as negative, whereas
    here negatives are the other pairs' positives (N-pair form); on one pair per class with
    ``ref_emb`` = positives, normalised inputs, equal α and ``l2_reg=0`` the two agree.
    """

    official_pairings = tuple((x, y) for x in range(4) for y in range(4) if x != y)

    def __init__(
        self,
        *,
        alpha: float = 45.0,
        l2_reg: float = 0.002,
        normalize: bool = False,
        with_npair: bool = False,
        weight: float = 1.0,
        synthesis: SymmetricalSynthesis | None,
    ):
        super().__init__(l2_reg=l2_reg, normalize=normalize, synthesis=synthesis)
        self.alpha = alpha
        self.with_npair = with_npair
        self.weight = weight
        self.sq_tan = math.tan(math.radians(alpha)) ** 2

    def pair_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """f(X, Y): diagonal 2(1+tan²α)·x_iᵀy_i, off-diagonal 4tan²α·(x_i+y_i)ᵀy_j."""
        off = 4 * self.sq_tan * (x + y) @ y.T
        diag = 2 * (1 + self.sq_tan) * (x * y).sum(1)
        return off.diagonal_scatter(diag)

    def logits(self, a: Tensor, p: Tensor) -> Tensor:
        out = super().logits(a, p)
        return out + a @ p.T if self.with_npair else out

    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        out = super().forward(embeddings, labels)
        return out if self.weight == 1.0 else LossOutput(out.value * self.weight, out.stats)
