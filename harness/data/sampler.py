"""The P×K batch sampler every pair- and proxy-based DML loss trains with."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from harness.errors import ConfigError

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
