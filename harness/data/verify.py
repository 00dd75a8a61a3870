"""Decode every image file of a dataset once, before anything trains on it, and remember what decoded.

A truncated or garbage JPEG otherwise fails only when a batch reaches it (for a test image: after every
epoch has trained). ``verify_images`` decodes files in parallel threads (Pillow releases the GIL while
decoding) with a tqdm bar and returns the bad ones with the reason. Files that decoded are remembered in
a small JSON cache keyed by path, size and modification time, so later runs and study trials on the same
files pay only a ``stat`` per file; a file that changes is decoded again.

Cache location: ``$DMLH_CACHE/verified/`` when ``DMLH_CACHE`` is set, else
``$XDG_CACHE_HOME/dmlh/verified/`` (default ``~/.cache/dmlh/verified/``): a user cache folder rather than
next to the dataset, which is often read-only or shared. One file per folder of images, written
atomically (merged with what concurrent writers saved), so several workers can verify at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from harness.data.images import ImageSet
from harness.errors import DatasetError

log = logging.getLogger(__name__)

CACHE_ENV = "DMLH_CACHE"

#: (path, reason) of one image file that cannot be used.
BadImage = tuple[str, str]


def cache_dir() -> Path:
    """The folder holding the verified-files records (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "verified"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dmlh" / "verified"


def _signature(path: str) -> list[int] | None:
    """(size, mtime in ns) of ``path``, None when it is not a readable file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def decode_problem(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used (missing, truncated, not an image), or None."""
    try:
        with Image.open(path) as img:
            img.load()  # the full decode: Image.open alone reads only the header
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image file Pillow can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be decoded ({e})"
    return None


def _record_path(folder: str) -> Path:
    key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
    return cache_dir() / f"{key}.json"


def _read_record(path: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, good: dict[str, list[int]]) -> None:
    """Merge ``good`` into the record at ``path`` and replace it atomically (safe with concurrent writers:
    each keeps what the others saved, a reader never sees a half-written file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_record(path), **good}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs a second decode next time
        log.warning("cannot save the verified-images record %s (%s); images will be decoded again", path, e)


def verify_images(
    paths: Sequence[str], *, use_cache: bool = True, workers: int | None = None, progress: bool = True
) -> list[BadImage]:
    """Decode every file of ``paths`` (with ``use_cache``, only those not verified unchanged before);
    returns (path, reason) of each bad one, sorted. Files that decode are recorded either way.

    ``workers`` threads decode in parallel (default: the CPUs available to this process, at most 32).
    """
    by_folder: dict[str, list[str]] = {}
    for p in dict.fromkeys(paths):
        by_folder.setdefault(os.path.dirname(os.path.dirname(os.path.abspath(p))), []).append(p)
    records = {folder: _record_path(folder) for folder in by_folder}
    todo: list[tuple[str, str, list[int]]] = []
    bad: list[BadImage] = []
    for folder, files in by_folder.items():
        known = _read_record(records[folder]) if use_cache else {}
        for p in files:
            sig = _signature(p)
            if sig is None:
                bad.append((p, "missing" if not os.path.lexists(p) else "not a readable file"))
            elif known.get(p) != sig:
                todo.append((folder, p, sig))
    if todo:
        n = workers or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)
        log.info(
            "decoding %d image files (%d already verified) with %d threads",
            len(todo),
            len(paths) - len(todo),
            n,
        )
        with ThreadPoolExecutor(max_workers=n) as pool:
            problems = list(
                tqdm(
                    pool.map(decode_problem, [p for _, p, _ in todo], chunksize=64),
                    total=len(todo),
                    desc="verifying images",
                    unit="img",
                    disable=not progress,
                )
            )
        good: dict[str, dict[str, list[int]]] = {}
        for (folder, p, sig), problem in zip(todo, problems, strict=True):
            if problem is None:
                good.setdefault(folder, {})[p] = sig
            else:
                bad.append((p, problem))
        for folder, entries in good.items():
            _write_record(records[folder], entries)
    return sorted(bad)


SHOW_BAD = 10


def describe_bad(bad: Sequence[BadImage], total: int, dataset: str) -> str:
    """``dataset: N of M image files cannot be used:`` then one ``path: reason`` line per file (the first
    ``SHOW_BAD``)."""
    shown = "\n".join(f"  - {p}: {why}" for p, why in bad[:SHOW_BAD])
    more = f"\n  ... and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
    return f"{dataset}: {len(bad)} of {total} image files cannot be used:\n{shown}{more}"


def verified(parts: dict[str, ImageSet], dataset: str, skip_bad: bool) -> dict[str, ImageSet]:
    """``parts`` with every image file decoded once (cached): a DatasetError listing the bad files, or with
    ``skip_bad`` the parts without them and a warning saying how many were dropped from which split."""
    files = {name: part for name, part in parts.items() if not part.in_memory}
    paths = [str(p) for part in files.values() for p in part.items]
    if not paths:
        return parts
    bad = verify_images(paths)
    if not bad:
        return parts
    if not skip_bad:
        raise DatasetError(
            describe_bad(bad, len(paths), dataset)
            + "\nreplace or remove them, or set data.skip_bad=true to train without them"
        )
    bad_paths = {p for p, _ in bad}
    out = dict(parts)
    dropped = []
    for name, part in files.items():
        keep = np.flatnonzero(~np.isin(part.items.astype(str), list(bad_paths)))
        if len(keep) < len(part):
            dropped.append(f"{len(part) - len(keep)} of {len(part)} from {name}")
            out[name] = part.subset(keep)
    log.warning("%s: data.skip_bad drops %d bad image files (%s)", dataset, len(bad), ", ".join(dropped))
    return out
