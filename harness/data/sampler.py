"""Batch samplers: the P×K sampler every pair- and proxy-based DML loss trains with, ABE-M's random
pair sampler (``sampler.kind: pairs``) and batches of offline-mined triplets (``sampler.kind: triplets``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from harness.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from harness.config import SamplerSection

log = logging.getLogger(__name__)


class PKSampler:
    """Batches of P distinct classes × K images each, for ``DataLoader(batch_sampler=...)``.

    - An epoch is ``batches_per_epoch`` batches, by default ``ceil(n_images / (P·K))`` so that an
      epoch shows about as many images as the split holds.
    - Each batch draws P classes uniformly without replacement (independently per batch), then K
      images of each class: without replacement when the class has at least K images; a class with
      2..K-1 images gives each of its images once and fills the rest by sampling with replacement.
    - Classes with a single image are never drawn (they give no positive pair); a warning with their
      count is logged once, when the sampler is built, as is the number of classes with fewer than K
      images (padded by repetition). Fewer than P usable classes is a ConfigError
      suggesting a smaller ``sampler.p``.
    - Deterministic: the batches of an epoch depend only on ``(seed, epoch)``; call ``set_epoch``
      before each epoch (as with DistributedSampler).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ):
        labels = np.asarray(labels)
        if p < 1 or k < 1:
            raise ConfigError(f"sampler: p and k must be >= 1 (got p={p}, k={k})")
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.cumsum(counts)[:-1])
        self.groups = [g for g in groups if len(g) >= 2]
        singles = len(groups) - len(self.groups)
        if singles:
            log.warning(
                "PKSampler: %d of %d classes have a single image and are dropped from training batches "
                "(a single image gives no positive pair)",
                singles,
                len(groups),
            )
        padded = sum(len(g) < k for g in self.groups)
        if padded:
            log.warning(
                "PKSampler: sampler.k=%d is larger than the image count of %d of %d classes; their batches "
                "repeat images to fill K (smallest class: %d images)",
                k,
                padded,
                len(self.groups),
                min(len(g) for g in self.groups),
            )
        if len(self.groups) < p:
            raise ConfigError(
                f"sampler.p: {p} classes per batch, but the training split has only {len(self.groups)} "
                f"classes "
                f"with at least 2 images; set sampler.p <= {len(self.groups)} (or use more training classes)"
            )
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.num_batches = batches_per_epoch or max(1, math.ceil(len(labels) / (p * k)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _draw(self, rng: np.random.Generator, group: np.ndarray) -> np.ndarray:
        if len(group) >= self.k:
            return rng.choice(group, self.k, replace=False)
        return np.concatenate([rng.permutation(group), rng.choice(group, self.k - len(group), replace=True)])

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch])
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.groups), self.p, replace=False)
            yield np.concatenate([self._draw(rng, self.groups[c]) for c in chosen]).tolist()


class PairSampler:
    """Batches of ``positive_pairs`` random same-class pairs and ``negative_pairs`` random different-class
    pairs (2 images each), as ABE-M trains (Kim et al. 2018: 16 + 16 pairs = 64 images).

    A positive pair is a class drawn uniformly among those with at least 2 images, then 2 distinct images
    of it; a negative pair is 2 images drawn uniformly from the whole split whose classes differ. A batch
    lists the positive pairs first, then the negative pairs, each pair as 2 consecutive indices. The loss
    sees the batch with its labels as usual (so a pair loss also uses the batch's other pairs). An epoch is
    ``batches_per_epoch`` batches (default: about as many images as the split holds); deterministic per
    ``(seed, epoch)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        positive_pairs: int,
        negative_pairs: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ):
        self.labels = np.asarray(labels)
        classes, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        self.order = np.argsort(inverse, kind="stable")  # image indices grouped by class
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.starts, self.sizes = starts[counts >= 2], counts[counts >= 2]  # classes with a positive pair
        if positive_pairs and not len(self.sizes):
            raise ConfigError(
                "sampler.positive_pairs: no training class has 2 images to make a positive pair"
            )
        if negative_pairs and len(classes) < 2:
            raise ConfigError("sampler.negative_pairs: the training split has a single class")
        self.positive_pairs, self.negative_pairs, self.seed, self.epoch = (
            positive_pairs,
            negative_pairs,
            seed,
            0,
        )
        size = 2 * (positive_pairs + negative_pairs)
        self.num_batches = batches_per_epoch or max(1, math.ceil(len(self.labels) / size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _negatives(self, rng: np.random.Generator) -> np.ndarray:
        """[negative_pairs, 2] image indices of different classes (rejection sampling, vectorised)."""
        out = np.empty((0, 2), dtype=np.int64)
        while len(out) < self.negative_pairs:
            draw = rng.integers(0, len(self.labels), (2 * self.negative_pairs, 2))
            out = np.concatenate([out, draw[self.labels[draw[:, 0]] != self.labels[draw[:, 1]]]])
        return out[: self.negative_pairs]

    def _positives(self, rng: np.random.Generator) -> np.ndarray:
        """[positive_pairs, 2] image indices: a uniform class, then 2 distinct uniform images of it."""
        if not self.positive_pairs:
            return np.empty((0, 2), dtype=np.int64)
        chosen = rng.integers(0, len(self.sizes), self.positive_pairs)
        size = self.sizes[chosen]
        first = rng.integers(0, size)
        second = (first + rng.integers(1, size)) % size  # uniform over the other size-1 images
        return self.order[self.starts[chosen, None] + np.stack([first, second], axis=1)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch])
        for _ in range(self.num_batches):
            pairs = np.concatenate([self._positives(rng), self._negatives(rng)])
            yield pairs.reshape(-1).tolist()


class TripletSampler:
    """Batches of ``triplets`` mined triplets, each as 3 consecutive indices (anchor, positive, negative), for
    offline mining (``sampler.kind: triplets``; ``harness.plugins.TripletBatches``).

    The trainer hands it the triplets a ``SplitMiner`` mined (``set_triplets``) at every refresh. The epochs
    until the next refresh walk through them in random order: one shuffled pass after another, drawn from
    ``(seed, refresh epoch)``, each epoch going on where the one before stopped, so every mined triplet is
    used about equally often. An epoch is ``batches_per_epoch`` batches, by default about as many images as
    the split holds (``ceil(n_images / (3 · triplets))``).
    """

    def __init__(self, n_images: int, triplets: int, batches_per_epoch: int | None = None, seed: int = 0):
        self.per_batch, self.seed, self.epoch = triplets, seed, 0
        self.num_batches = batches_per_epoch or max(1, math.ceil(n_images / (3 * triplets)))
        self.triplets: np.ndarray | None = None
        self.since = 0

    def set_triplets(self, triplets: np.ndarray, epoch: int) -> None:
        """Batch ``triplets`` ``[T, 3]`` from ``epoch`` on (until the next call)."""
        triplets = np.asarray(triplets, dtype=np.int64).reshape(-1, 3)
        if not len(triplets):
            raise TrainingError("sampler.kind: triplets: the miner handed over no triplet")
        self.triplets, self.since = triplets, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        if self.triplets is None:
            raise TrainingError(
                "sampler.kind: triplets has no triplets yet: a miner that mines the training split "
                "(miner: offline) hands them over before each refresh epoch"
            )
        rng = np.random.default_rng([self.seed % 2**32, self.since])
        need = self.num_batches * self.per_batch
        start = (self.epoch - self.since) * need
        passes = math.ceil((start + need) / len(self.triplets))
        order = np.concatenate([rng.permutation(len(self.triplets)) for _ in range(passes)])[start:]
        for b in range(self.num_batches):
            chosen = order[b * self.per_batch : (b + 1) * self.per_batch]
            yield self.triplets[chosen].reshape(-1).tolist()


class RepeatedAugmentations:
    """Every image of the wrapped sampler's batches ``repeats`` times in a row (MultiGrain's repeated
    augmentation, Berman et al. 2019 / Hoffer et al. 2020): the dataset transform runs per item, so each
    copy gets its own random augmentation, and the copies are positives of each other."""

    def __init__(self, sampler: PKSampler | PairSampler, repeats: int):
        self.sampler, self.repeats = sampler, repeats

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield np.repeat(batch, self.repeats).tolist()


def build_sampler(
    section: SamplerSection, labels: np.ndarray, seed: int
) -> PKSampler | PairSampler | TripletSampler | RepeatedAugmentations:
    """The batch sampler ``sampler.kind`` names, over the training ``labels``, with each image repeated
    ``sampler.repeated_augmentations`` times."""
    sampler: PKSampler | PairSampler
    if section.kind == "triplets":  # config.validate refuses repeated augmentations with it
        return TripletSampler(len(labels), section.triplets, section.batches_per_epoch, seed)
    if section.kind == "pairs":
        pairs = (section.positive_pairs, section.negative_pairs)
        sampler = PairSampler(labels, *pairs, section.batches_per_epoch, seed)
    else:
        sampler = PKSampler(labels, section.p, section.k, section.batches_per_epoch, seed=seed)
    repeats = section.repeated_augmentations
    return RepeatedAugmentations(sampler, repeats) if repeats > 1 else sampler
