"""Symmetrical Synthesis (Gu & Ko, AAAI 2020): hard negatives from reflections of same-class pairs.

Given two embeddings a, b of one class, the synthetic point ``b' = beta * (alpha * proj_a(b) - b)`` is
(for alpha=2, beta=1) the mirror image of b across the line through the origin spanned by a: it keeps
b's norm and its similarity to a (``aᵀb' = aᵀb``), so the positive side of a loss is unchanged, while
the negatives it creates are often harder. Synthetics are computed inside the loss from the
gradient-carrying embeddings and are never added as labelled samples.

Three ways a loss uses it:

* the paper's rule (Fig. 1): a negative is a same-class pair (x_k, x_l) with the candidates
  {x_k, x_l, x_k', x_l'} (:meth:`SymmetricalSynthesis.pair_negative_candidates`). Batch-all triplet makes
  one term per (anchor, positive, negative pair) and lifted structured sums one log-sum-exp term per
  negative pair, each with the pair's hardest candidate (:meth:`SymmetricalSynthesis.hardest_pair_negatives`);
  semi-hard triplet (the paper's † rows) represents each pair by its closest candidate farther than the
  positive, else its hardest, and makes the semi-hard choice among those (methods/miners.py);
* the other pair-based losses (batch-hard / random triplet, contrastive, multi-similarity) call
  :meth:`SymmetricalSynthesis.hardest_negatives` and use its matrix in place of their plain negative
  distances / similarities (per negative, the hardest of the original and its reflections about the
  other members of its class; per anchor and class this is the paper's hardest candidate, so batch-hard
  selection matches the paper);
* N-pair-layout losses (n-pair, angular) call :meth:`SymmetricalSynthesis.pooled_logits`, the official
  code's element-wise max of the logit matrices over pairings of (A, P, S1, S2).

All record how often a synthetic point was the hardest (``epoch_diagnostics``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import BenchVariant
from harness.registry import register
from methods.distances import cosine_similarity, pairwise_distance

Metric = Literal["euclidean", "sqeuclidean", "cosine", "dot"]

#: +1: a distance (smaller is harder), -1: a similarity (larger is harder).
_HARDNESS_SIGN = {"euclidean": 1.0, "sqeuclidean": 1.0, "cosine": -1.0, "dot": -1.0}

#: Indices of the original point sets (A, P) in ``pooled_logits``' (A, P, S1, S2).
_ORIGINAL = {0, 1}

#: Original points of the last training batch kept per epoch in ``synthesis_snapshot`` (with as many
#: synthetic ones, in at most as many coordinates: about 40 KB of diagnostics.json per epoch).
SNAPSHOT_POINTS = 48


def _sign(metric: str) -> float:
    """+1 for a distance, -1 for a similarity; a clear error for an unknown metric."""
    sign = _HARDNESS_SIGN.get(metric)
    if sign is None:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(_HARDNESS_SIGN)}")
    return sign


def metric_matrix(x: Tensor, y: Tensor, metric: Metric) -> Tensor:
    """[N, M] matrix of ``metric`` between the rows of x and y ("cosine" and "dot" are similarities)."""
    if metric == "cosine":
        return cosine_similarity(x, y)
    if metric == "dot":
        return x @ y.T
    return pairwise_distance(x, metric, y)


@register(
    "synthesis", "symmetrical", bench=[BenchVariant("+ symmetrical synthesis", {"synthesis": "symmetrical"})]
)
class SymmetricalSynthesis(nn.Module):
    """Symmetrical synthesis (Gu & Ko 2020): reflect same-class pairs about each other, mine the hardest.

    alpha, beta: ``b' = beta * (alpha * proj_a(b) - b)``; the defaults (2, 1) give the mirror image.
    norm: rescale b' to the length of its axis a (the official ``symm_norm`` flag, off by default).
    pairing: for N-pair-layout losses, "official" uses the pairings of the official code (n-pair: the 6
        unordered combinations of {A, P, S1, S2}; angular: the 12 ordered pairs of distinct sets);
        "all" uses all 16 ordered pairings (an ablation; a pairing of a set with itself contributes
        only off-diagonal entries, since a point paired with itself is not a positive pair).
        ``hardest_negatives`` always uses every reflection, so ``pairing`` does not affect it.
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 1.0,
        norm: bool = False,
        pairing: Literal["official", "all"] = "official",
    ):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.norm = norm
        self.pairing = pairing
        # synthetic winners / negative entries, synthetic selections / selections (see epoch_diagnostics)
        self.register_buffer("counts", torch.zeros(4, dtype=torch.long), persistent=False)
        self._last_batch: tuple[Tensor, Tensor] | None = None  # the last training batch, for the snapshot

    def reflect(self, axis: Tensor, point: Tensor) -> Tensor:
        """Reflect ``point`` about ``axis`` (broadcasting over leading dimensions, last dim = features)."""
        unit = F.normalize(axis, dim=-1)
        out = self.beta * (self.alpha * (point * unit).sum(-1, keepdim=True) * unit - point)
        if self.norm:
            out = F.normalize(out, dim=-1) * axis.norm(dim=-1, keepdim=True)
        return out

    def hardest_negatives(self, embeddings: Tensor, labels: Tensor, metric: Metric) -> Tensor:
        """[B, B] matrix of ``metric``; for y_i != y_k the hardest value over x_k and its reflections.

        Entry (i, k) with y_i != y_k is the smallest distance (largest similarity) from x_i to any of
        x_k and reflect(x_k about x_l) for every other member l of x_k's class; entries with y_i == y_k
        are the plain metric(x_i, x_k). Per anchor, the hardest entry of a class is the hardest of the
        paper's candidates over all pairs of that class (what batch-hard and semi-hard mining need). The
        reflections form a [B, K-1, D] tensor (K = largest class count in the batch) and the candidate
        metrics a [B, B, K-1] tensor.
        """
        sign = _sign(metric)
        b = len(labels)
        same = labels[:, None] == labels[None, :]
        others = same & ~torch.eye(b, dtype=torch.bool, device=labels.device)
        original = sign * metric_matrix(embeddings, embeddings, metric)  # hardness order: smaller = harder
        n_other = int(others.sum(1).max()) if b else 0
        best_synthetic = torch.full_like(original, float("inf"))
        if n_other:
            # members l != k of k's class first in each row, then padding (masked below)
            order = others.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :n_other]
            valid = others.gather(1, order)  # [B, K-1]
            synthetic = self.reflect(embeddings[order], embeddings[:, None, :])  # [k, j]: x_k about x_l(j)
            cand = sign * metric_matrix(embeddings, synthetic.flatten(0, 1), metric).view(b, b, n_other)
            best_synthetic = cand.masked_fill(~valid[None], float("inf")).amin(-1)
        self._record(original, best_synthetic, labels, labels)
        self._keep(embeddings, labels)
        won = ~same & (best_synthetic < original)
        return sign * torch.where(won, best_synthetic, original)

    def pair_negative_candidates(
        self, embeddings: Tensor, labels: Tensor, metric: Metric
    ) -> tuple[Tensor, Tensor]:
        """The paper's candidates: per anchor and same-class pair (x_k, x_l), ``metric`` to each of the four.

        Returns ``values`` [B, Q, 4], the ``metric`` from x_i to x_k, x_l, x_k' and x_l' (x_k' = x_k reflected
        about x_l, x_l' = x_l about x_k) for each of the Q unordered same-class pairs k < l of the batch, and
        ``pair_labels`` [Q], the class of each pair. A class with one image in the batch gives one column
        whose four candidates are that image (it has no pair, hence no reflection). A loss selects among the
        candidates of the columns whose label differs from the anchor's: hardest (batch-all, lifted) or
        semi-hard (``methods.miners.semi_hard_pair_negatives``).
        """
        sign = _sign(metric)
        same = labels[:, None] == labels[None, :]
        k, l = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
        single = (same.sum(1) == 1).nonzero(as_tuple=True)[0]
        k, l = torch.cat([k, single]), torch.cat([l, single])
        original = sign * metric_matrix(embeddings, embeddings, metric)
        synthetic = torch.cat(
            [self.reflect(embeddings[l], embeddings[k]), self.reflect(embeddings[k], embeddings[l])]
        )
        reflected = sign * metric_matrix(embeddings, synthetic, metric).view(len(labels), 2, len(k))
        reflected = torch.where((k == l)[None, None], original[:, None, k], reflected)  # singles: x_k
        cand = torch.stack([original[:, k], original[:, l], reflected[:, 0], reflected[:, 1]], -1)
        best_synthetic = cand[..., 2:].amin(-1).masked_fill((k == l)[None], float("inf"))
        self._record(cand[..., :2].amin(-1), best_synthetic, labels, labels[k])
        self._keep(embeddings, labels)
        return sign * cand, labels[k]

    def hardest_pair_negatives(
        self, embeddings: Tensor, labels: Tensor, metric: Metric
    ) -> tuple[Tensor, Tensor]:
        """The paper's rule: per anchor and same-class pair (x_k, x_l), the hardest of {x_k, x_l, x_k', x_l'}.

        ``values`` [B, Q] and ``pair_labels`` [Q] as in :meth:`pair_negative_candidates`, reduced to the
        hardest candidate of each pair (Fig. 1 of the paper). Batch-all triplet makes one term per (anchor,
        positive, negative pair) of them; lifted structured sums them in its log-sum-exp.
        """
        cand, pair_labels = self.pair_negative_candidates(embeddings, labels, metric)
        sign = _sign(metric)
        return sign * (sign * cand).amin(-1), pair_labels

    def pooled_logits(
        self,
        anchors: Tensor,
        positives: Tensor,
        logits: Callable[[Tensor, Tensor], Tensor],
        official: Sequence[tuple[int, int]],
    ) -> Tensor:
        """Element-wise max of ``logits(X, Y)`` [N, N] over pairings of (A, P, S1, S2).

        anchors, positives: [N, D], row i of both from class i. S1 = P reflected about A, S2 = A
        reflected about P. ``official`` lists the loss's official pairings as index pairs into
        (A, P, S1, S2); with ``pairing="all"`` every ordered pairing is used, self-pairings only off the
        diagonal. The diagonal (positive) entries take part in the max too, as in the official code.
        """
        sets = (anchors, positives, self.reflect(anchors, positives), self.reflect(positives, anchors))
        classes = torch.arange(len(anchors), device=anchors.device)
        self._keep(torch.cat([anchors, positives]), torch.cat([classes, classes]))
        pairs = list(official) if self.pairing == "official" else list(itertools.product(range(4), repeat=2))
        mats = torch.stack([logits(sets[x], sets[y]) for x, y in pairs], dim=-1)  # [N, N, pairings]
        self_pair = torch.tensor([x == y for x, y in pairs], device=mats.device)
        eye = torch.eye(len(anchors), dtype=torch.bool, device=mats.device)
        pooled, winner = mats.masked_fill(eye[..., None] & self_pair, float("-inf")).max(-1)
        with torch.no_grad():
            synthetic_pairing = torch.tensor([not {x, y} <= _ORIGINAL for x, y in pairs], device=mats.device)
            won = synthetic_pairing[winner][~eye].sum()  # one entry per (anchor class, negative class)
            n = won.new_tensor(len(anchors) * (len(anchors) - 1))
            self.counts += torch.stack([won, n, won, n])
        return pooled

    @torch.no_grad()
    def _record(
        self, original: Tensor, best_synthetic: Tensor, labels: Tensor, column_labels: Tensor
    ) -> None:
        """Count synthetic winners per negative entry (i, column) and per (anchor i, negative class c).

        original, best_synthetic: [B, C] in hardness order (smaller = harder), the best original and the
        best synthetic candidate of each column (a point or a same-class pair) whose class is
        ``column_labels`` [C]. The hardest negative of class c for anchor i is synthetic when the best
        synthetic over c's columns beats the best original.
        """
        b = len(labels)
        classes = torch.unique(torch.cat([labels, column_labels]), return_inverse=True)[1]
        rows, cols = classes[:b], classes[b:]
        n_classes = int(classes.max()) + 1 if b else 0
        per_class = original.new_full((b, n_classes), float("inf"))
        index = cols[None, :].expand(b, -1)
        orig_c = per_class.scatter_reduce(1, index, original, "amin")
        synth_c = per_class.scatter_reduce(1, index, best_synthetic, "amin")
        negative = rows[:, None] != cols[None, :]
        neg_c = rows[:, None] != torch.arange(n_classes, device=labels.device)[None, :]
        entry_won = negative & (best_synthetic < original)
        class_won = neg_c & (synth_c < orig_c)
        self.counts += torch.stack([entry_won.sum(), negative.sum(), class_won.sum(), neg_c.sum()]).long()

    def _keep(self, embeddings: Tensor, labels: Tensor) -> None:
        """Remember a training batch (detached, no copy) for the epoch's snapshot; evaluation is not kept."""
        if self.training:
            self._last_batch = (embeddings.detach(), labels.detach())

    @torch.no_grad()
    def snapshot(self) -> dict[str, list[Any]] | None:
        """Original and synthetic points of the last training batch, for the t-SNE figure of the report.

        The first ``SNAPSHOT_POINTS`` images of classes with at least two images in the batch (a class cut
        at the limit to one image is left out), each reflected about the next image of its class in batch
        order (cyclically; for an N-pair loss the pairs' A and P, so the synthetic points are its S2 and
        S1). Points are written in an orthonormal basis of the originals' span when the embedding has more
        dimensions than points: an isometry that keeps every distance and the reflection formula (the
        synthetic points lie in that span), with fewer numbers. Values rounded to 4 decimals.
        """
        if self._last_batch is None:
            return None
        x, labels = self._last_batch
        x, labels = x.detach().cpu().double(), labels.cpu()
        keep = ((labels[:, None] == labels[None, :]).sum(1) > 1).nonzero().squeeze(1)[:SNAPSHOT_POINTS]
        kept = labels[keep]
        keep = keep[(kept[:, None] == kept[None, :]).sum(1) > 1]
        if not len(keep):
            return None
        x, labels = x[keep], labels[keep]
        n = len(labels)
        index = torch.arange(n)
        gap = (index[None, :] - index[:, None]) % n  # how far after row i column j comes, cyclically
        partner = gap.masked_fill((labels[:, None] != labels[None, :]) | (gap == 0), n).argmin(1)
        synthetic = self.reflect(x[partner], x)
        if x.shape[1] > n:
            basis = torch.linalg.svd(x, full_matrices=False).Vh  # [n, D], orthonormal rows
            x, synthetic = x @ basis.T, synthetic @ basis.T
        return {
            "labels": labels.tolist(),
            "partner": partner.tolist(),
            "original": x.round(decimals=4).tolist(),
            "synthetic": synthetic.round(decimals=4).tolist(),
        }

    def epoch_diagnostics(self) -> dict[str, Any]:
        """Fractions of synthetic hard negatives since the last call, and a snapshot (then reset).

        synthetic_hard_fraction: over (anchor, negative class), how often the hardest candidate of that
            class (originals and synthetics) was synthetic — the negative that hard mining selects (semi-hard
            mining may select an easier one).
        synthetic_entry_fraction: over negative entries, how often a reflection beat the originals: entries
            (i, k) with x_k against its reflections, or under the pair rule (i, pair (k, l)).
        synthesis_snapshot: :meth:`snapshot` of the epoch's last training batch (a record, not a scalar).
        Empty when nothing was recorded.
        """
        entry_won, entries, class_won, selections = self.counts.tolist()
        self.counts.zero_()
        out: dict[str, Any] = {}
        if entries:
            out["synthetic_hard_fraction"] = class_won / selections
            out["synthetic_entry_fraction"] = entry_won / entries
        snapshot = self.snapshot()
        self._last_batch = None
        if snapshot is not None:
            out["synthesis_snapshot"] = snapshot
        return out
