"""Decode every image file of a dataset once, before anything trains on it, and remember what decoded.

A truncated or garbage JPEG otherwise fails only when a batch reaches it (for a test image: after every
epoch has trained), and an image that decodes but is wrong trains wrongly without a word. ``inspect_images``
decodes files in parallel threads (Pillow releases the GIL while decoding) with a tqdm bar, converts each
with ``harness.data.images.to_rgb`` (what training does) and returns the bad ones with the reason
(missing, truncated, not an image, a side shorter than ``data.min_side``, a mode that cannot be converted
to RGB) and the ones converted on load (CMYK, palette, alpha, 16-bit). Files that decoded are remembered
(with their size in pixels and mode) in a small JSON cache keyed by path, size and modification time, so
later runs and study trials on the same files pay only a ``stat`` per file; a file that changes is decoded
again.

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
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.data.images import CONVERSIONS, MIN_SIDE, ImageSet, UnusableImage, to_rgb
from harness.errors import DatasetError
from harness.files import as_umask_allows
from harness.logs import progress_bar

log = logging.getLogger(__name__)

CACHE_ENV = "DMLH_CACHE"

#: (path, reason) of one image file that cannot be used.
BadImage = tuple[str, str]
#: What the record keeps of a file that decoded: [file size, mtime in ns, width, height, mode].
Entry = list[int | str]


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


@dataclass(frozen=True)
class Decoded:
    """What decoding one file found: why it cannot be used (``problem``), else its size and mode."""

    problem: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""


def decode_file(path: str) -> Decoded:
    """Decode the image file at ``path`` fully and convert it as training does (``to_rgb``): the problem
    (missing, truncated, not an image, a mode that cannot become RGB), else its size and mode. A file whose
    content is another format than its extension says (a PNG named ``.jpg``) is fine: logged at debug."""
    try:
        with Image.open(path) as img:
            img.load()  # the full decode: Image.open alone reads only the header
            to_rgb(img)
            width, height, mode, fmt = img.width, img.height, img.mode, img.format
    except FileNotFoundError:
        return Decoded("missing")
    except UnidentifiedImageError:
        return Decoded("not an image file Pillow can identify")
    except UnusableImage as e:
        return Decoded(f"cannot be converted to RGB: {e}")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return Decoded(f"cannot be decoded ({e})")
    named = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt and named and fmt != named:
        log.debug("%s: a %s file named as %s (decodes fine)", path, fmt, named)
    return Decoded(None, width, height, mode)


def size_problem(width: int, height: int, min_side: int) -> str | None:
    """Why an image of ``width`` x ``height`` px is too small to train on, or None."""
    if min(width, height) < min_side:
        return f"{width}x{height} px: a side is shorter than data.min_side={min_side} px"
    return None


def _record_path(folder: str) -> Path:
    key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
    return cache_dir() / f"{key}.json"


def _read_record(path: Path) -> dict[str, Entry]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, good: dict[str, Entry]) -> None:
    """Merge ``good`` into the record at ``path`` and replace it atomically (safe with concurrent writers:
    each keeps what the others saved, a reader never sees a half-written file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_record(path), **good}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        as_umask_allows(tmp)  # mkstemp's 0600 would hide the record from the colleagues sharing the cache
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs a second decode next time
        log.warning("cannot save the verified-images record %s (%s); images will be decoded again", path, e)


@dataclass
class Inspection:
    """What ``inspect_images`` found: the bad files (sorted, with the reason) and the files that decode
    but are converted on load (path, what ``to_rgb`` does), sorted."""

    bad: list[BadImage] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)


def _known(entry: object, sig: list[int]) -> Decoded | None:
    """The record ``entry`` of a file whose signature is ``sig`` as a Decoded, None when it is stale or of
    an older format (then the file is decoded again)."""
    if not isinstance(entry, list) or len(entry) != 5 or entry[:2] != sig:
        return None
    _, _, width, height, mode = entry
    if not isinstance(width, int) or not isinstance(height, int) or not isinstance(mode, str):
        return None
    return Decoded(None, width, height, mode)


def inspect_images(
    paths: Sequence[str],
    *,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    min_side: int = MIN_SIDE,
) -> Inspection:
    """Decode every file of ``paths`` (with ``use_cache``, only those not verified unchanged before) and
    find each that cannot be used (see the module docstring); files that decode are recorded either way.

    ``workers`` threads decode in parallel (default: the CPUs available to this process, at most 32).
    """
    unique = list(dict.fromkeys(paths))
    by_folder: dict[str, list[str]] = {}
    for p in unique:
        by_folder.setdefault(os.path.dirname(os.path.dirname(os.path.abspath(p))), []).append(p)
    records = {folder: _record_path(folder) for folder in by_folder}
    todo: list[tuple[str, str, list[int]]] = []
    found: dict[str, Decoded] = {}
    absent = 0
    for folder, files in by_folder.items():
        known = _read_record(records[folder]) if use_cache else {}
        for p in files:
            sig = _signature(p)
            if sig is None:
                absent += 1
                found[p] = Decoded("missing" if not os.path.lexists(p) else "not a readable file")
            elif (entry := _known(known.get(p), sig)) is not None:
                found[p] = entry
            else:
                todo.append((folder, p, sig))
    if todo:
        n = workers or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)
        log.info(
            "decoding %d image files (%d already verified%s) with %d threads",
            len(todo),
            len(unique) - len(todo) - absent,
            f", {absent} missing or unreadable" if absent else "",
            n,
        )
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(
                progress_bar(
                    pool.map(decode_file, [p for _, p, _ in todo], chunksize=64),
                    show=progress,
                    total=len(todo),
                    desc="verifying images",
                    unit="img",
                )
            )
        good: dict[str, dict[str, Entry]] = {}
        for (folder, p, sig), d in zip(todo, results, strict=True):
            found[p] = d
            if d.problem is None:
                good.setdefault(folder, {})[p] = [*sig, d.width, d.height, d.mode]
        for folder, entries in good.items():
            _write_record(records[folder], entries)
    out = Inspection()
    for p, d in found.items():
        problem = d.problem or size_problem(d.width, d.height, min_side)
        if problem is not None:
            out.bad.append((p, problem))
        elif d.mode in CONVERSIONS:
            out.converted.append((p, CONVERSIONS[d.mode]))
    out.bad.sort()
    out.converted.sort()
    return out


def verify_images(
    paths: Sequence[str],
    *,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    min_side: int = MIN_SIDE,
) -> list[BadImage]:
    """(path, reason) of each file of ``paths`` that cannot be used, sorted (``inspect_images``)."""
    return inspect_images(
        paths, use_cache=use_cache, workers=workers, progress=progress, min_side=min_side
    ).bad


#: How many files a message lists by name before it says only how many more there are.
SHOW_BAD = 20


def listing(entries: Sequence[tuple[str, str]], limit: int = SHOW_BAD) -> str:
    """One ``  - path: what`` line per entry (the first ``limit``), then ``  ... and N more``."""
    shown = "\n".join(f"  - {p}: {why}" for p, why in entries[:limit])
    more = f"\n  ... and {len(entries) - limit} more" if len(entries) > limit else ""
    return shown + more


def describe_bad(bad: Sequence[BadImage], total: int, dataset: str) -> str:
    """``dataset: N of M image files cannot be used:`` then one ``path: reason`` line per file (the first
    ``SHOW_BAD``)."""
    return f"{dataset}: {len(bad)} of {total} image files cannot be used:\n{listing(bad)}"


def describe_converted(converted: Sequence[tuple[str, str]]) -> str:
    """``N image files are converted when loaded:`` then one ``path: conversion`` line per file."""
    return f"{len(converted)} image files are converted to RGB when loaded:\n{listing(converted)}"


def verified(
    parts: dict[str, ImageSet], dataset: str, skip_bad: bool, min_side: int = MIN_SIDE
) -> dict[str, ImageSet]:
    """``parts`` with every image file decoded once (cached): a DatasetError listing the bad files, or with
    ``skip_bad`` the parts without them and a warning naming the dropped files and how many were dropped
    from which split."""
    files = {name: part for name, part in parts.items() if not part.in_memory}
    paths = [str(p) for part in files.values() for p in part.items]
    if not paths:
        return parts
    found = inspect_images(paths, min_side=min_side)
    if found.converted:
        kinds = Counter(what for _, what in found.converted)
        log.info(
            "%s: %d image files are converted to RGB when loaded (%s); `dmlh data check` names them",
            dataset,
            len(found.converted),
            ", ".join(f"{n} {what}" for what, n in sorted(kinds.items())),
        )
    bad = found.bad
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
    log.warning(
        "%s: data.skip_bad drops %d bad image files (%s):\n%s",
        dataset,
        len(bad),
        ", ".join(dropped),
        listing(bad),
    )
    return out
