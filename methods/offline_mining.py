"""Offline triplet mining (FaceNet, Schroff et al. 2015; Hermans et al. 2017, "offline" variant): the triplets
come from the embeddings of the whole training split, mined again every ``refresh_every`` epochs, instead of
from each batch. The trainer embeds the split and calls ``mine_split`` (``harness.plugins.SplitMiner``); the
``sampler.kind: triplets`` sampler puts the triplets in the batches, 3 consecutive images each, and the
batch-level ``forward`` hands the loss exactly those triplets.

Per anchor one triplet (a, p, n). The anchors are the images of every class with at least 2 images.

* positive ``hardest``: the farthest other image of the anchor's class (class by class, rows of an
  n_c × n_c block at a time); ``random``: another image of its class, uniformly.
* negative ``hard``: the closest image of another class. ``semi_hard``: the closest image of another class
  strictly farther from the anchor than the positive, else (no negative is farther) the farthest one:
  TF's ``triplet_semihard_loss`` rule, the same as the online ``semi_hard`` mining (methods/miners.py).

The triplets are exactly those a full N×N distance matrix would give, found without one. Negatives come
from faiss k-NN searches over the split (``harness.evaluate.knn``: exact squared distances, float64 rounded
to float32, which every comparison here uses), ``neighbours`` per anchor first; an anchor whose neighbours
hold no qualifying negative is searched again with twice as many, until one is found or it has seen the
whole split (only a semi-hard anchor without a farther negative gets that far). Memory is O(anchors ×
neighbours) per search. Mining depends only on the order of distances: euclidean and sqeuclidean mine the
same triplets, cosine mines on L2-normalised embeddings.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from harness.errors import TrainingError
from harness.evaluate import knn
from harness.registry import register
from methods.distances import Distance
from methods.miners import TripletMiner, Triplets

#: Largest block of values one distance computation or search allocates (4M: 32 MiB in float64).
BLOCK = 2**22


def _classes(labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image indices grouped by class (``order``), each class's ``start`` in it and ``size``, and each
    image's class (``inverse``)."""
    _, inverse, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    return order, torch.cumsum(sizes, 0) - sizes, sizes, inverse


def hardest_positives(x: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
    """Per anchor the farthest other image of its class (ties: the lowest index)."""
    order, starts, sizes, inverse = _classes(labels)
    best = torch.full((len(labels),), -1, dtype=torch.long)
    for start, size in zip(starts.tolist(), sizes.tolist(), strict=True):
        if size < 2:
            continue
        members = order[start : start + size]
        step = max(1, BLOCK // size)
        for s in range(0, size, step):
            rows = members[s : s + step]
            exact = "donot_use_mm_for_euclid_dist"
            d = torch.cdist(x[rows].double(), x[members].double(), compute_mode=exact)
            d[torch.arange(len(rows)), torch.arange(s, s + len(rows))] = -torch.inf  # not the anchor itself
            best[rows] = members[d.argmax(1)]
    return best[anchors]


def random_positives(labels: Tensor, anchors: Tensor, rng: np.random.Generator) -> Tensor:
    """Per anchor another image of its class, uniformly (its class's images in a ring, a uniform step of
    1..size-1 from the anchor)."""
    order, starts, sizes, inverse = _classes(labels)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[inverse[order]]
    cls = inverse[anchors]
    step = torch.from_numpy(rng.integers(1, sizes[cls].numpy()))
    return order[starts[cls] + (rank[anchors] + step) % sizes[cls]]


def squared_distances(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Squared Euclidean distance of ``x[rows[i]]`` to ``x[cols[i]]`` as ``knn`` ranks: float64, rounded to
    float32."""
    return (x[cols].double() - x[rows].double()).square().sum(1).float()


def closest_negatives(
    x: Tensor, labels: Tensor, anchors: Tensor, beyond: Tensor, neighbours: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor the closest image of another class strictly farther than ``beyond`` (squared distances;
    ``-inf``: any), else the farthest image of another class; found by k-NN searches that double k for the
    anchors still open.

    Returns the negatives, whether each was the farthest-negative fallback, and the neighbours searched.
    """
    n = len(x)
    negative = torch.full((len(anchors),), -1, dtype=torch.long)
    fallback = torch.zeros(len(anchors), dtype=torch.bool)
    searched = torch.zeros(len(anchors), dtype=torch.long)
    pending, k = torch.arange(len(anchors)), min(neighbours, n - 1)
    while len(pending):
        rows = max(1, BLOCK // (k + 1))
        still = []
        for chunk in pending.split(rows):
            q = anchors[chunk]
            d, cand = knn(x, k + 1, x[q], distance="euclidean", backend="faiss")  # + the anchor itself
            other = labels[cand] != labels[q][:, None]  # the anchor itself is never "other"
            ok = other & (d > beyond[chunk, None])
            found = ok.any(1)
            pick = d.masked_fill(~ok, torch.inf).argmin(1)
            if cand.shape[1] >= n:  # the whole split was seen: no farther negative, take the farthest
                fallback[chunk[~found]] = True
                pick = torch.where(found, pick, d.masked_fill(~other, -torch.inf).argmax(1))
                found = torch.ones_like(found)
            negative[chunk[found]] = cand.gather(1, pick[:, None])[found, 0]
            searched[chunk[found]] = cand.shape[1] - 1
            still.append(chunk[~found])
        pending, k = torch.cat(still), min(2 * k, n - 1)
    return negative, fallback, searched


@register("miner", "offline")
class OfflineTripletMiner(TripletMiner):
    """Offline mining (FaceNet): a hard or semi-hard triplet per anchor of the training split, every N epochs.

    Trains with ``sampler.kind: triplets``, whose batches are the mined triplets.

    strategy: the negative, ``hard`` (the closest) or ``semi_hard`` (the closest farther than the positive,
        else the farthest). positive: ``hardest`` (the farthest of the anchor's class) or ``random``.
    neighbours: the first k-NN search size per anchor (only speed depends on it; anchors that need more
        are searched again). refresh_every: epochs between minings, from epoch 0 (the initial model).
    distance: as the loss's (with ``loss.normalize: true`` use ``cosine``); only the order counts.
    """

    def __init__(
        self,
        *,
        strategy: Literal["hard", "semi_hard"] = "hard",
        positive: Literal["hardest", "random"] = "hardest",
        neighbours: Annotated[int, Field(ge=1)] = 64,
        refresh_every: Annotated[int, Field(ge=1)] = 1,
        distance: Distance = "euclidean",
    ):
        super().__init__()
        self.strategy = strategy
        self.positive = positive
        self.neighbours = neighbours
        self.refresh_every = refresh_every
        self.distance = distance

    def mine(self, embeddings: Tensor, pos: Tensor, neg: Tensor) -> Triplets:
        """The batch's triplets as the sampler laid them out: images 3i, 3i+1, 3i+2."""
        a = torch.arange(0, len(embeddings), 3, device=embeddings.device)
        if len(embeddings) % 3 or not (pos[a, a + 1].all() and neg[a, a + 2].all()):
            raise TrainingError(
                "miner 'offline': the batch is not (anchor, positive, negative) triplets in a row; "
                "it trains only with sampler.kind: triplets"
            )
        return a, a + 1, a + 2

    def mine_split(
        self, embeddings: Tensor, labels: Tensor, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, float]]:
        """``[T, 3]`` triplets (anchor, positive, negative) of the split, one per anchor in index order, and
        their statistics (mean distances, fraction with the negative closer than the positive, semi-hard
        farthest-negative fallbacks, mean neighbours searched)."""
        x = embeddings.detach().to("cpu", torch.float64)
        x = (F.normalize(x, dim=1) if self.distance == "cosine" else x).float()  # what knn searches
        labels = torch.as_tensor(labels).cpu()
        _, inverse, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        anchors = (sizes[inverse] >= 2).nonzero().squeeze(1) if len(sizes) >= 2 else inverse[:0]
        if not len(anchors):
            raise TrainingError(
                "miner 'offline': the training split has no class with 2 images and another class"
            )
        if self.positive == "hardest":
            positives = hardest_positives(x, labels, anchors)
        else:
            positives = random_positives(labels, anchors, rng)
        d_ap = squared_distances(x, anchors, positives)
        beyond = d_ap if self.strategy == "semi_hard" else torch.full_like(d_ap, -torch.inf)
        negatives, fallback, searched = closest_negatives(x, labels, anchors, beyond, self.neighbours)
        d_an = squared_distances(x, anchors, negatives)
        shown = {"euclidean": torch.sqrt, "sqeuclidean": lambda d: d, "cosine": lambda d: d / 2}  # from d²
        stats = {
            "triplets": float(len(anchors)),
            "pos_dist": float(shown[self.distance](d_ap.double()).mean()),
            "neg_dist": float(shown[self.distance](d_an.double()).mean()),
            "closer_negative": float((d_an < d_ap).double().mean()),
            "farthest_fallback": float(fallback.double().mean()),
            "neighbours": float(searched.double().mean()),
        }
        return torch.stack([anchors, positives, negatives], 1).numpy(), stats
