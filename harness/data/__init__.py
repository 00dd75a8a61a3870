"""Data layer: dataset adapters (registered as kind ``dataset``), class-disjoint splits, the P×K batch
sampler and the transforms derived from a backbone's declared input convention."""

from __future__ import annotations

from typing import Any

from harness import registry
from harness.data.datasets import DatasetSplits
from harness.data.images import MIN_SIDE, ImageSet
from harness.data.sampler import PKSampler
from harness.data.splits import Splits, carve_validation, load_splits
from harness.data.transforms import build_transforms
from harness.data.verify import describe_bad, describe_converted, inspect_images, verify_images
from harness.errors import ConfigError, DatasetError

__all__ = [
    "DatasetSplits",
    "ImageSet",
    "PKSampler",
    "Splits",
    "build_transforms",
    "carve_validation",
    "check_dataset",
    "verify_images",
    "load_splits",
]


def check_dataset(
    name: str,
    root: str | None = None,
    workers: int | None = None,
    *,
    train_classes: Any = None,
    min_side: int = MIN_SIDE,
) -> str:
    """Images and classes per split of dataset ``name`` (at ``root``, its classes split by
    ``train_classes`` as ``data.dataset.train_classes`` of a run config does; None: the dataset's default)
    after decoding every image file (in ``workers`` threads, with a progress bar), and the files converted
    to RGB on load; or a DatasetError listing each missing, truncated, undecodable or too small (a side
    below ``min_side`` px) file with the reason."""
    params: dict[str, Any] = {"root": root} if root is not None else {}
    if train_classes is not None:
        params["train_classes"] = train_classes
    try:
        ds = registry.build("dataset", name, path="dataset", **params)
    except ConfigError as e:
        if train_classes is None and any("train_classes" in p for p in e.problems):
            hint = "`dmlh data check` takes the split rule as --train-classes (see `dmlh list dataset`)"
            raise ConfigError([*e.problems, hint]) from e
        raise
    parts = {"train": ds.train, "test" if ds.query is None else "gallery": ds.test}
    if ds.query is not None:
        parts["query"] = ds.query
    paths = [str(p) for part in parts.values() if not part.in_memory for p in part.items]
    found = inspect_images(paths, use_cache=False, workers=workers, min_side=min_side)
    if found.bad:
        raise DatasetError(describe_bad(found.bad, sum(len(p) for p in parts.values()), name))
    lines = [
        f"{name}" + (f" ({ds.source})" if ds.source else "") + f": OK ({len(paths)} image files decoded)",
        f"  {'split':<8} {'images':>8} {'classes':>8}",
    ]
    lines += [f"  {split:<8} {len(part):>8} {part.num_classes:>8}" for split, part in parts.items()]
    if found.converted:
        lines.append(describe_converted(found.converted))
    return "\n".join(lines)
