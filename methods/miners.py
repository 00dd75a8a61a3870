"""Miners (kind ``miner``): pick the triplets or pairs a loss is computed on, as index tensors.

A triplet miner returns ``(a, p, n)``, a pair miner ``(a1, p, a2, n)`` (positive pairs (a1, p), negative
pairs (a2, n); pytorch-metric-learning's convention). The selection functions below are shared with the
losses' built-in mining (methods/losses/triplet.py, multi_similarity.py), so "triplet with
mining=batch_hard" and "triplet + batch_hard miner" are the same computation. Miners never carry
gradients: they run under ``torch.no_grad`` on the loss's own distances.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.registry import register
from methods.distances import (
    Distance,
    cosine_similarity,
    full_precision,
    label_masks,
    pairwise_distance,
    squared_euclidean,
)

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]


def positive_pairs(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Ordered positive pairs (a, p) whose anchor has at least one negative (else no triplet exists)."""
    a, p = (pos & neg.any(1, keepdim=True)).nonzero(as_tuple=True)
    return a, p


def all_triplets(pos: Tensor, neg: Tensor) -> Triplets:
    """Every valid triplet: (a, p) a positive pair, n a negative of a (Hermans' batch-all)."""
    a, p = positive_pairs(pos, neg)
    pair, n = neg[a].nonzero(as_tuple=True)
    return a[pair], p[pair], n


def triplet_counts(pos: Tensor, neg: Tensor, triplets: Triplets | None = None) -> tuple[Tensor, Tensor]:
    """How many triplets use each anchor-positive and each anchor-negative entry: two [B, B] float matrices.

    A loss that adds a term of D_ap to a term of D_an per triplet (the margin loss) sums each term once over
    the [B, B] distance matrix, weighted by these counts, instead of gathering two distances per triplet.
    ``triplets`` None: all valid triplets (:func:`all_triplets`), never enumerated: (a, p) is used once per
    negative of a, (a, n) once per positive of a (anchors without a negative have no triplet).
    """
    if triplets is None:
        valid = pos & neg.any(1, keepdim=True)
        return valid * neg.sum(1, keepdim=True).float(), neg * valid.sum(1, keepdim=True).float()
    a, p, n = triplets
    size = len(pos)

    def count(i: Tensor, j: Tensor) -> Tensor:
        return torch.bincount(i * size + j, minlength=size * size).view(size, size).float()

    return count(a, p), count(a, n)


def batch_hard_triplets(dist: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
    """One triplet per anchor: its furthest positive and closest negative (Hermans et al. 2017).

    Anchors without a positive (a class with a single image) or without a negative are dropped, as in
    PML's BatchHardMiner; triplet-reid instead keeps them with the anchor itself as "positive" (d⁺ = 0).
    """
    anchors = (pos.any(1) & neg.any(1)).nonzero().squeeze(1)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1)
    return anchors, hardest_pos[anchors], hardest_neg[anchors]


def semi_hard_triplets(dist: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
    """FaceNet semi-hard, as TF's ``triplet_semihard_loss``: one triplet per positive pair (a, p).

    n = the closest negative strictly farther from a than p; if there is none, the farthest negative.
    Not PML's ``TripletMarginMiner("semihard")``, which keeps *every* negative with
    ``0 < D_an - D_ap <= margin`` (several triplets per pair, none for pairs without such a negative).
    """
    a, p = positive_pairs(pos, neg)
    d_an, negs = dist[a], neg[a]
    farther = negs & (d_an > dist[a, p][:, None])
    closest_farther = d_an.masked_fill(~farther, float("inf")).argmin(1)
    farthest = d_an.masked_fill(~negs, float("-inf")).argmax(1)
    return a, p, torch.where(farther.any(1), closest_farther, farthest)


def semi_hard_pair_negatives(
    dist: Tensor, cand: Tensor, negs: Tensor, a: Tensor, p: Tensor
) -> tuple[Tensor, Tensor]:
    """Semi-hard mining under Symm's pair rule: one negative candidate per positive pair (a, p).

    ``cand`` [B, Q, C]: distances from each anchor to the C candidates of each same-class pair (x_k, x_l,
    x_k', x_l', see methods/synthesis.py), ``negs`` [B, Q] the pairs of another class than the anchor's,
    ``dist`` [B, B] the anchor-positive distances. Each negative pair is represented by its closest
    candidate strictly farther than the positive, else by its closest candidate (the paper's hardest of the
    four); among the pairs, TF's rule (:func:`semi_hard_triplets`). So the negative is the closest candidate
    farther than the positive over all negative pairs, else the closest candidate of the pair whose closest
    candidate is farthest. Returns the pair ``q`` [P] and the candidate ``c`` [P].
    """
    n_cand = cand.shape[-1]
    flat = cand.masked_fill(~negs[..., None], float("-inf")).flatten(1)  # pairs of a's class: never farther
    d_an = flat[a]  # [P, Q·C]
    closest, index = torch.where(d_an > dist[a, p][:, None], d_an, float("inf")).min(1)
    hardest, slot = cand.min(-1)  # [B, Q]: each pair's closest candidate
    q = hardest.masked_fill(~negs, float("-inf")).argmax(1)[a]
    found = torch.isfinite(closest)
    return torch.where(found, index // n_cand, q), torch.where(found, index % n_cand, slot[a, q])


def sample_negatives(weights: Tensor, a: Tensor, p: Tensor) -> Triplets:
    """One negative per positive pair (a, p), drawn from the row ``weights[a]`` (torch's global RNG)."""
    if len(a) == 0:
        return a, p, a.clone()
    return a, p, torch.multinomial(weights[a], 1).squeeze(1)


def sample_distinct_negatives(weights: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
    """MultiGrain's draw (``DistanceWeightedSampling``): per anchor as many negatives as it has positives,
    without replacement from ``weights[a]``, the j-th positive paired with the j-th draw. An anchor with
    fewer eligible negatives than the batch's largest positive count draws with replacement (MultiGrain
    falls back the same way when it cannot draw without)."""
    a, p = positive_pairs(pos, neg)
    if len(a) == 0:
        return a, p, a.clone()
    anchors, counts = torch.unique_consecutive(a, return_counts=True)  # nonzero() is row-major: a sorted
    k = int(counts.max())
    w = weights[anchors]
    enough = (w > 0).sum(1) >= k
    draws = torch.empty(len(anchors), k, dtype=torch.long, device=w.device)
    for rows, replacement in ((enough, False), (~enough, True)):
        if rows.any():
            draws[rows] = torch.multinomial(w[rows], k, replacement=replacement)
    row = torch.repeat_interleave(torch.arange(len(anchors), device=a.device), counts)
    rank = torch.arange(len(a), device=a.device) - (torch.cumsum(counts, 0) - counts)[row]
    return a, p, draws[row, rank]


def random_triplets(pos: Tensor, neg: Tensor) -> Triplets:
    """One uniformly random negative per positive pair (MDR's RandomNegative)."""
    return sample_negatives(neg.float(), *positive_pairs(pos, neg))


def distance_weights(
    embeddings: Tensor, neg: Tensor, cutoff: float, nonzero_loss_cutoff: float, normalize_over: str
) -> Tensor:
    """[B, B] sampling probabilities of distance-weighted sampling (Wu et al. 2017; MDR's DistanceWeighted).

    On L2-normalised embeddings, with D clamped at ``cutoff`` (the diagonal set to 1, as in MDR),
    ``log w = (2 - dim) log D - ((dim - 3) / 2) log(1 - D²/4)`` (the inverse of the density of
    distances between uniform points on the sphere). Weights are zero for non-negatives and for
    ``D >= nonzero_loss_cutoff``; a row whose weights all vanish is uniform over its negatives. Rows are
    normalised; rows without negatives are all zero.

    normalize_over: the maximum subtracted before ``exp``. "row" (official): the whole row, positives
    and diagonal included, in float32, so far negatives can underflow to zero and trigger the uniform
    fallback; "candidates": the eligible negatives only (the paper's distribution, no underflow).
    """
    x = F.normalize(embeddings.float(), dim=1)
    dim = x.shape[1]
    dist = squared_euclidean(x).sqrt().fill_diagonal_(1.0).clamp_min(cutoff)
    log_w = (2.0 - dim) * dist.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * dist.pow(2)).clamp_min(1e-12).log()
    eligible = neg & (dist < nonzero_loss_cutoff)
    if normalize_over == "candidates":
        log_w = log_w.masked_fill(~eligible, float("-inf"))
    top = log_w.amax(1, keepdim=True)
    w = torch.where(eligible, torch.exp(log_w - torch.where(torch.isfinite(top), top, 0.0)), 0.0)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, neg.float())
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def multi_similarity_masks(sim: Tensor, pos: Tensor, neg: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """MS pair mining (Wang et al. 2019): the kept positive and negative pairs as [B, B] masks.

    Keep negative k of anchor i if ``S_ik + ε > min_{j∈P_i} S_ij`` and positive j if
    ``S_ij - ε < max_{k∈N_i} S_ik``; both thresholds come from the un-mined sets.
    """
    hardest_pos = sim.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    hardest_neg = sim.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    return pos & (sim - epsilon < hardest_neg), neg & (sim + epsilon > hardest_pos)


class TripletMiner(nn.Module):
    """Base of the triplet miners: ``forward(embeddings, labels) -> (a, p, n)`` without gradients."""

    produces: ClassVar[str] = "triplets"

    @torch.no_grad()
    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        return self.mine(embeddings.detach(), *label_masks(labels))

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        raise NotImplementedError


@register("miner", "batch_all")
class BatchAllMiner(TripletMiner):
    """Every valid triplet of the batch (Hermans' batch-all)."""

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        return all_triplets(pos, neg)


@register("miner", "batch_hard")
class BatchHardMiner(TripletMiner):
    """Per anchor the furthest positive and the closest negative (Hermans et al. 2017)."""

    def __init__(self, *, distance: Distance = "euclidean"):
        super().__init__()
        self.distance = distance

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        return batch_hard_triplets(pairwise_distance(embeddings, self.distance), pos, neg)


@register("miner", "semi_hard")
class SemiHardMiner(TripletMiner):
    """Per positive pair the closest negative farther than the positive, else the farthest (FaceNet/TF).

    Mining depends only on the order of distances, so euclidean and sqeuclidean select the same triplets.
    """

    def __init__(self, *, distance: Distance = "euclidean"):
        super().__init__()
        self.distance = distance

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        return semi_hard_triplets(pairwise_distance(embeddings, self.distance), pos, neg)


@register("miner", "random")
class RandomMiner(TripletMiner):
    """Per positive pair one negative drawn uniformly at random."""

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        return random_triplets(pos, neg)


@register("miner", "distance_weighted")
class DistanceWeightedMiner(TripletMiner):
    """Distance-weighted sampling (Wu et al. 2017) as in MDR: one negative per ordered positive pair.

    Sampled on an L2-normalised, gradient-free copy of the embeddings (see ``distance_weights``); the
    loss then uses its own (e.g. un-normalised) distances for these triplets. draws: "per_pair" (MDR,
    PML: each pair's negative drawn independently, with replacement) or "per_anchor_distinct"
    (MultiGrain / Wu's official code: an anchor's negatives are distinct, see
    ``sample_distinct_negatives``).
    """

    def __init__(
        self,
        *,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        normalize_over: Literal["row", "candidates"] = "row",
        draws: Literal["per_pair", "per_anchor_distinct"] = "per_pair",
    ):
        super().__init__()
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.normalize_over = normalize_over
        self.draws = draws

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        w = distance_weights(embeddings, neg, self.cutoff, self.nonzero_loss_cutoff, self.normalize_over)
        if self.draws == "per_anchor_distinct":
            return sample_distinct_negatives(w, pos, neg)
        return sample_negatives(w, *positive_pairs(pos, neg))


@register("miner", "multi_similarity")
class MultiSimilarityMiner(nn.Module):
    """Multi-similarity pair mining (Wang et al. 2019) on cosine similarity, margin ``epsilon``."""

    produces: ClassVar[str] = "pairs"

    def __init__(self, *, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon

    @torch.no_grad()
    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> Pairs:
        pos, neg = label_masks(labels)
        pos_kept, neg_kept = multi_similarity_masks(cosine_similarity(embeddings), pos, neg, self.epsilon)
        return (*pos_kept.nonzero(as_tuple=True), *neg_kept.nonzero(as_tuple=True))
