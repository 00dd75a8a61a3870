"""Decoded-image cache: every image file decoded once, resized, and kept as uint8 for all later reads.

PIL decoding costs a few ms per photo, every epoch, in every trial. ``DecodedCache`` decodes the image
files of an ``ImageSet`` once (threads: Pillow releases the GIL), crops the bounding box if any, resizes
so that the shorter side is ``size`` (the test transform's resize size, so the test transform's own
``Resize`` is then a no-op) and stores the pixels of all images back to back in one flat uint8 file plus
an index ``[N, 3]`` of (offset, height, width).

- ``disk``: the files live in ``$DMLH_CACHE/decoded/<key>/`` (default ``~/.cache/dmlh/decoded/``) and are
  read through ``np.memmap``, so every epoch, trial and DataLoader worker shares one copy in the OS page
  cache. ``<key>`` hashes each file's path, size and mtime, the boxes and ``size``: a changed file gives a
  new key (the old folder is simply no longer used). A cache is built in a private temporary folder and
  renamed into place atomically; when two processes build the same cache, the first rename wins and the
  other discards its copy.
- ``memory``: the same arrays held in this process (a worker process receives a copy).
- ``auto``: ``disk`` when the estimated size fits ``data.cache_budget_gib`` and the free space of the
  cache folder, else off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from harness.data.images import ImageSet, open_rgb
from harness.data.splits import Splits
from harness.data.transforms import recipe_kind, recipe_sizes
from harness.data.verify import CACHE_ENV
from harness.files import as_umask_allows
from harness.types import DataConfig

if TYPE_CHECKING:
    from harness.config import DataSection

log = logging.getLogger(__name__)

#: Bumped whenever the stored format, the RGB conversion or the resize changes (old caches are then ignored).
FORMAT_VERSION = 2
#: Assumed width/height of a photo when the size of a cache is estimated before decoding it.
ASPECT_ESTIMATE = 4 / 3


def cache_root() -> Path:
    """The folder of decoded-image caches (``$DMLH_CACHE/decoded``, else ``~/.cache/dmlh/decoded``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "decoded"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dmlh" / "decoded"


def cache_key(paths: Sequence[str], boxes: np.ndarray | None, size: int) -> str:
    """Hash of what the cached pixels depend on: each file's path, size and mtime, the boxes and ``size``."""
    h = hashlib.sha256(f"v{FORMAT_VERSION} size={size}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if boxes is not None:
        h.update(np.ascontiguousarray(boxes, dtype=np.float64).tobytes())
    return h.hexdigest()[:24]


def decode_resized(path: str, box: np.ndarray | None, size: int) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of the file at ``path``, cropped to ``box`` and resized so that its shorter
    side is ``size`` (bilinear with antialiasing, as torchvision's ``Resize`` on a PIL image); converted
    to RGB by ``open_rgb``, as ``ImageSet`` reads a file."""
    img = open_rgb(path)
    if box is not None:
        img = img.crop(tuple(box))
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision's rule for Resize(int)
    new = (size, new_long) if w <= h else (new_long, size)
    if new != (w, h):
        img = img.resize(new, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def estimate_bytes(n: int, size: int) -> int:
    """Expected bytes of a cache of ``n`` photos at shorter side ``size``."""
    return int(n * size * size * ASPECT_ESTIMATE * 3)


class DecodedCache:
    """Decoded, resized images ``0..N-1``: ``cache[i]`` is a uint8 ``[H, W, 3]`` view.

    Pickles as its folder only (a DataLoader worker maps the files itself) when on disk.
    """

    def __init__(self, index: np.ndarray, pixels: np.ndarray | None, folder: Path | None):
        self.index = index
        self._pixels = pixels
        self.folder = folder

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            assert self.folder is not None, "a memory cache always holds its pixels"
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        return self._pixels

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        offset, h, w = (int(v) for v in self.index[i])
        return self.pixels[offset : offset + h * w * 3].reshape(h, w, 3)

    @property
    def nbytes(self) -> int:
        return int((self.index[:, 1] * self.index[:, 2]).sum() * 3)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.folder is not None:
            state["_pixels"] = None
        return state

    @classmethod
    def open(cls, folder: Path) -> DecodedCache:
        return cls(np.load(folder / "index.npy"), None, folder)

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        boxes: np.ndarray | None,
        size: int,
        where: str = "disk",
        workers: int | None = None,
    ) -> DecodedCache:
        """The cache of ``paths`` at ``size``: opened when a complete one exists on disk, else decoded
        now (``where`` = ``disk`` or ``memory``)."""
        assert where in ("disk", "memory"), where
        if where == "memory":
            arrays = list(_decoded(paths, boxes, size, workers))
            index = _index([a.shape for a in arrays])
            return cls(index, np.concatenate([a.ravel() for a in arrays]), None)
        folder = cache_root() / cache_key(paths, boxes, size)
        if (folder / "index.npy").is_file():
            log.info("decoded-image cache %s (%d images)", folder, len(paths))
            return cls.open(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        as_umask_allows(tmp)  # a cache shared through $DMLH_CACHE: mkdtemp's 0700 would hide it
        try:
            shapes = []
            with open(tmp / "pixels.u8", "wb") as out:
                for a in _decoded(paths, boxes, size, workers):
                    out.write(a.tobytes())
                    shapes.append(a.shape)
            np.save(tmp / "index.npy", _index(shapes))
            (tmp / "meta.json").write_text(json.dumps({"size": size, "n": len(paths), "v": FORMAT_VERSION}))
            try:
                os.rename(tmp, folder)  # atomic; fails when another process renamed its copy first
            except OSError:
                log.info("decoded-image cache %s was built concurrently by another process", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(folder)


def _index(shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """``[N, 3]`` int64 (offset, height, width) of images of ``shapes`` stored back to back."""
    hw = np.array([s[:2] for s in shapes], dtype=np.int64).reshape(-1, 2)
    sizes = hw[:, 0] * hw[:, 1] * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return np.column_stack([offsets, hw])


def _decoded(
    paths: Sequence[str], boxes: np.ndarray | None, size: int, workers: int | None
) -> Iterator[np.ndarray]:
    """The decoded, resized images of ``paths`` in order, decoded in ``workers`` threads."""
    n = workers or min(32, len(os.sched_getaffinity(0)))
    log.info(
        "decoding %d image files once into the cache (shorter side %d px, %d threads)", len(paths), size, n
    )
    with ThreadPoolExecutor(max_workers=n) as pool:
        yield from pool.map(
            decode_resized,
            paths,
            [None] * len(paths) if boxes is None else list(boxes),
            [size] * len(paths),
            chunksize=32,
        )


def choose(mode: str, n: int, size: int, budget_gib: float) -> str:
    """``off``, ``memory`` or ``disk`` for ``data.cache`` = ``mode`` and ``n`` images at ``size``."""
    if mode != "auto":
        return mode
    need = estimate_bytes(n, size)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > budget_gib * 2**30 or need > free:
        log.info(
            "data.cache=auto: not caching (%.1f GiB needed, budget %.1f GiB, %.1f GiB free in %s)",
            need / 2**30,
            budget_gib,
            free / 2**30,
            root,
        )
        return "off"
    return "disk"


def attach(parts: dict[str, ImageSet], mode: str, size: int, budget_gib: float) -> dict[str, ImageSet]:
    """``parts`` reading their image files from one ``DecodedCache`` of all their distinct files, stored in
    the order of their paths (so that every trial of a dataset, whatever its validation classes and split
    order, shares one cache per set of files and size); unchanged when ``mode`` (or
    ``auto``'s choice) is ``off`` or no part holds files."""
    files = {name: part for name, part in parts.items() if not part.in_memory}
    row_of: dict[str, int] = {}
    box_of: dict[str, np.ndarray | None] = {}
    for part in files.values():
        for j, p in enumerate(part.items):
            if p not in row_of:
                row_of[p] = len(row_of)
                box_of[p] = part.boxes[j] if part.boxes is not None else None
    where = choose(mode, len(row_of), size, budget_gib) if row_of else "off"
    if where == "off":
        return parts
    # rows in path order: the cache (and its key) is that of the set of files, whatever the split's order
    paths = sorted(row_of)
    row_of = {p: i for i, p in enumerate(paths)}
    given = [b for b in (box_of[p] for p in paths) if b is not None]
    assert len(given) in (0, len(paths)), "the parts of one dataset all have boxes or none"
    boxes = np.stack(given) if given else None
    cache = DecodedCache.build(paths, boxes, size, where)
    out = dict(parts)
    for name, part in files.items():
        out[name] = part.with_cache(cache, np.array([row_of[p] for p in part.items], dtype=np.int64))
    return out


def cached_splits(splits: Splits, data: DataSection, data_config: DataConfig) -> Splits:
    """``splits`` reading their image files from the decoded-image cache ``data.cache`` asks for, at the
    shorter side of the recipe's resize size (``harness.data.transforms.recipe_sizes``): the largest image
    its training crops are cut from, so no crop is upsampled from a smaller stored copy."""
    kind = recipe_kind(data, splits.channels)
    _, resize = recipe_sizes(data, data_config, kind)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test, "query": splits.query}
    present = {k: v for k, v in parts.items() if v is not None}
    out = attach(present, data.cache, resize, data.cache_budget_gib)
    return dataclasses.replace(
        splits, train=out["train"], val=out.get("val"), test=out["test"], query=out.get("query")
    )


def num_workers(data: DataSection, splits: Splits) -> int:
    """``data.num_workers``, with ``auto`` = 0 for in-memory images (nothing to decode) and otherwise the
    CPUs available to this process minus one for the training loop, at most 8."""
    if data.num_workers != "auto":
        return data.num_workers
    if splits.train.in_memory:
        return 0
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))
