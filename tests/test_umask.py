"""Shared servers (issue #27): the decoded-image cache and the verified-images record, written through
``tempfile`` and renamed into place, get the modes the user's umask allows, as run folders do
(tests/test_run_monitoring.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.data.cache import DecodedCache, cache_root
from harness.data.verify import inspect_images
from tests.fixtures import make_cub200


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("DMLH_CACHE", str(tmp_path / "cache"))
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_caches_are_as_readable_as_the_umask_allows(umask: int, tmp_path: Path) -> None:
    root = make_cub200(tmp_path / "cub", classes=(1, 2), per_class=2, size=16)
    paths = sorted(str(p) for p in (root / "images").rglob("*.jpg"))
    assert not inspect_images(paths, progress=False).bad
    records = list((cache_root().parent / "verified").iterdir())
    assert records and all(r.stat().st_mode & 0o777 == 0o666 & ~umask for r in records)
    cache = DecodedCache.build(paths, None, 8, "disk", workers=1)
    assert cache.folder is not None
    assert cache.folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (cache.folder / "pixels.u8").stat().st_mode & 0o777 == 0o666 & ~umask
