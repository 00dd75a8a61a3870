"""Class-disjoint train / validation / test splits: validation classes are carved out of the training
classes, so model selection (and hyperparameter search) never looks at test classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from harness import registry
from harness.config import split_params
from harness.data.datasets import DatasetSplits
from harness.data.images import ImageSet
from harness.data.verify import verified
from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.config import DataSection

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The splits a run uses. ``train`` is labelled 0..num_train_classes-1 (proxies, softmax heads);
    ``val`` (None when ``data.val_fraction`` is 0) holds other training-distribution classes; ``test`` is
    searched against itself, or is the gallery searched by ``query`` (In-Shop)."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    query: ImageSet | None
    channels: int
    num_train_classes: int


#: (val_fraction, classes) whose rounding was already reported by this process.
_WARNED: set[tuple[float, int]] = set()


def carve_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Move ``round(fraction · C)`` of the C training classes (at least 2, leaving at least 2) to a
    validation split, chosen by ``seed``. Returns (train relabelled 0..C'-1, val or None)."""
    if fraction <= 0:
        return train.subset(np.arange(len(train)), relabel=True), None
    classes = np.unique(train.labels)
    n = len(classes)
    rounded = int(fraction * n + 0.5)
    n_val = min(max(2, rounded), n - 2)
    if n_val < 2:
        raise ConfigError(
            f"data.val_fraction: validation needs at least 4 training classes (2 to validate on, 2 to train "
            f"on) but the dataset has {n}; set data.val_fraction=0"
        )
    lo, hi = (0.0 if n_val == 2 else (n_val - 0.5) / n), (1.0 if n_val == n - 2 else (n_val + 0.5) / n)
    same = f"every val_fraction in [{lo:.3g}, {hi:.3g}) gives this same split"
    if rounded != n_val and (fraction, n) not in _WARNED:  # once per process: a study loads it every trial
        _WARNED.add((fraction, n))
        why = "at least 2 classes validate" if rounded < 2 else "at least 2 classes must remain to train on"
        log.warning(
            "data.val_fraction=%g of %d training classes rounds to %d validation classes; using %d (%s), "
            "leaving %d to train on; %s",
            fraction,
            n,
            rounded,
            n_val,
            why,
            n - n_val,
            same,
        )
    elif rounded == n_val:
        log.info(
            "data.val_fraction=%g: %d of %d training classes validate, %d train (%s)",
            fraction,
            n_val,
            n,
            n - n_val,
            same,
        )
    val_classes = np.random.default_rng(seed).choice(classes, n_val, replace=False)
    is_val = np.isin(train.labels, val_classes)
    return train.subset(np.flatnonzero(~is_val), relabel=True), train.subset(np.flatnonzero(is_val))


def load_splits(data: DataSection) -> Splits:
    """Build ``data.dataset`` from the registry, decode its image files once (``harness.data.verify``: a
    bad file stops the run here, before any training, unless ``data.skip_bad``), and carve validation
    classes out of its training classes."""
    name, params = split_params(data.dataset)
    ds = registry.build("dataset", name, path="data.dataset", **params)
    assert isinstance(ds, DatasetSplits), f"dataset {name!r} returned {type(ds).__name__}, not DatasetSplits"
    parts = verified(
        {"train": ds.train, "test": ds.test, **({"query": ds.query} if ds.query is not None else {})},
        name,
        data.skip_bad,
        data.min_side,
    )
    train, val = carve_validation(parts["train"], data.val_fraction, data.split_seed)
    return Splits(
        train=train,
        val=val,
        test=parts["test"],
        query=parts.get("query"),
        channels=ds.train.channels,
        num_train_classes=train.num_classes,
    )
