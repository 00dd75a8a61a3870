"""Data layer: dataset adapters (registered as kind ``dataset``), class-disjoint splits, the P×K batch
sampler and the transforms derived from a backbone's declared input convention."""

from __future__ import annotations

from typing import Any

from harness import registry
from harness.data.datasets import DatasetSplits
from harness.data.images import ImageSet
from harness.data.sampler import PKSampler
from harness.data.splits import Splits, carve_validation, load_splits
from harness.data.transforms import build_transforms
from harness.errors import DatasetError

__all__ = [
    "DatasetSplits",
    "ImageSet",
    "PKSampler",
    "Splits",
    "build_transforms",
    "carve_validation",
    "check_dataset",
    "load_splits",
]

_SHOW_MISSING = 5


def check_dataset(name: str, root: str | None = None) -> str:
    """Images and classes per split of dataset ``name`` (at ``root``), or a DatasetError saying exactly
    which files are missing or malformed, including image files referenced but absent."""
    params: dict[str, Any] = {"root": root} if root is not None else {}
    ds = registry.build("dataset", name, path="dataset", **params)
    parts = {"train": ds.train, "test" if ds.query is None else "gallery": ds.test}
    if ds.query is not None:
        parts["query"] = ds.query
    missing = [p for part in parts.values() for p in part.missing_files()]
    if missing:
        shown = "\n".join(f"  - {p}" for p in missing[:_SHOW_MISSING])
        more = f"\n  ... and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        total = sum(len(p) for p in parts.values())
        raise DatasetError(f"{name}: {len(missing)} of {total} image files are missing:\n{shown}{more}")
    lines = [
        f"{name}" + (f" ({ds.source})" if ds.source else "") + ": OK",
        f"  {'split':<8} {'images':>8} {'classes':>8}",
    ]
    lines += [f"  {split:<8} {len(part):>8} {part.num_classes:>8}" for split, part in parts.items()]
    return "\n".join(lines)
