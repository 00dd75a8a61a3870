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
from harness.data.verify import describe_bad, verify_images
from harness.errors import DatasetError

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


def check_dataset(name: str, root: str | None = None, workers: int | None = None) -> str:
    """Images and classes per split of dataset ``name`` (at ``root``) after decoding every image file (in
    ``workers`` threads, with a progress bar), or a DatasetError listing each missing, truncated or
    undecodable file with the reason."""
    params: dict[str, Any] = {"root": root} if root is not None else {}
    ds = registry.build("dataset", name, path="dataset", **params)
    parts = {"train": ds.train, "test" if ds.query is None else "gallery": ds.test}
    if ds.query is not None:
        parts["query"] = ds.query
    paths = [str(p) for part in parts.values() if not part.in_memory for p in part.items]
    bad = verify_images(paths, use_cache=False, workers=workers)
    if bad:
        raise DatasetError(describe_bad(bad, sum(len(p) for p in parts.values()), name))
    lines = [
        f"{name}" + (f" ({ds.source})" if ds.source else "") + f": OK ({len(paths)} image files decoded)",
        f"  {'split':<8} {'images':>8} {'classes':>8}",
    ]
    lines += [f"  {split:<8} {len(part):>8} {part.num_classes:>8}" for split, part in parts.items()]
    return "\n".join(lines)
