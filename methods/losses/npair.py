"""N-pair loss (Sohn, NeurIPS 2016) in the TF ``npairs_loss`` form that Symmetrical Synthesis uses.

Also home of the N-pair batch layout shared with the angular loss: from a P×K batch the pairs are
the first two images of each class (A = anchors, P = positives, row i of both from one class);
further images of a class are not used and classes with a single image are skipped.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import Reference
from harness.registry import register
from harness.types import LossOutput
from methods.distances import full_precision
from methods.synthesis import SymmetricalSynthesis


def first_two_per_class(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the first and second image (in batch order) of every class that has two or more."""
    order = torch.sort(labels, stable=True).indices
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = (counts.cumsum(0) - counts)[counts >= 2]
    return order[starts], order[starts + 1]


class PairSoftmaxLoss(nn.Module):
    """Softmax cross-entropy over an [N, N] logit matrix of N (anchor, positive) pairs, N-pair layout.

    Subclasses define ``pair_logits(X, Y)``; the target of row i is column i (one pair per class, so the
    TF row-normalised label-equality target is the identity). Loss = mean over anchors of the
    cross-entropy + ``l2_reg * 0.25 * (mean ||a||² + mean ||p||²)`` on the raw embeddings (TF
    ``npairs_loss``). With a ``synthesis`` the logits are its element-wise max over pairings of
    (A, P, S1, S2) (``official_pairings``, indices into that tuple). No pair in the batch: 0.
    """

    official_pairings: ClassVar[tuple[tuple[int, int], ...]]

    def __init__(self, *, l2_reg: float, normalize: bool, synthesis: SymmetricalSynthesis | None):
        super().__init__()
        self.l2_reg = l2_reg
        self.normalize = normalize
        self.synthesis = synthesis

    def pair_logits(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, a: Tensor, p: Tensor) -> Tensor:
        """The [N, N] logits of the pairs: ``pair_logits`` or, with a synthesis, its pooled version."""
        if self.synthesis is None:
            return self.pair_logits(a, p)
        return self.synthesis.pooled_logits(a, p, self.pair_logits, self.official_pairings)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        a_idx, p_idx = first_two_per_class(labels)
        n = len(a_idx)
        if n == 0:
            return LossOutput(embeddings.sum() * 0.0, {"pairs": 0})
        pairs = embeddings[torch.cat([a_idx, p_idx])]  # one gather (one scatter in backward)
        a, p = pairs.chunk(2)
        reg = self.l2_reg * 0.5 * pairs.pow(2).sum(1).mean()  # 0.25 (mean |a|² + mean |p|²): as many of each
        if self.normalize:
            a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
        logits = self.logits(a, p)
        target = torch.arange(n, device=logits.device)
        xent = F.cross_entropy(logits, target)
        with torch.no_grad():
            # pair_accuracy: fraction of anchors whose positive is the highest column (ties to the first)
            stats = {
                "pairs": n,
                "xent": xent.detach(),
                "pos_logit": logits.diagonal().mean(),  # float32 (full_precision)
                "pair_accuracy": (logits.argmax(1) == target).float().mean(),
            }
        return LossOutput(xent + reg, stats)


def _pml_references() -> list[Reference]:
    """PML's NPairsLoss on dot products of the raw embeddings."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import DotProductSimilarity

    return [
        Reference(lambda c, d: losses.NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False)))
    ]


@register("loss", "npair", references=_pml_references)
class NPairLoss(PairSoftmaxLoss):
    """N-pair loss (Sohn 2016): softmax over anchor·positive dot products, TF npairs_loss form.

    logits = A·Pᵀ on un-normalised embeddings (``normalize=False``; PML's NPairsLoss normalises by
    default), softmax cross-entropy averaged over anchors, plus ``l2_reg·0.25·(mean‖a‖² + mean‖p‖²)``
    with l2_reg = 0.002 (TF / Symm default). Pairs: the first two images of each class.
    With symmetrical synthesis (official Symm+N-pair): logits = element-wise max of X·Yᵀ over the 6
    pairings (A,P), (A,S1), (A,S2), (P,S1), (P,S2), (S1,S2).

    Differences from pytorch-metric-learning's NPairsLoss: PML has no L2 regulariser and normalises
    embeddings unless given a non-normalising distance; with ``l2_reg=0`` and
    ``DotProductSimilarity(normalize_embeddings=False)`` the two are equal (PML also takes the first
    two images of each class).
    """

    official_pairings = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # itertools.combinations order

    def __init__(
        self, *, l2_reg: float = 0.002, normalize: bool = False, synthesis: SymmetricalSynthesis | None
    ):
        super().__init__(l2_reg=l2_reg, normalize=normalize, synthesis=synthesis)

    def pair_logits(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ y.T
