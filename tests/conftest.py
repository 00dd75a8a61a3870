"""Shared test set-up: small thread counts (CI has 2 cores), no progress bars, a private cache folder."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# The verified-images record (harness/data/verify.py) of the tests stays out of the user's ~/.cache.
os.environ["DMLH_CACHE"] = tempfile.mkdtemp(prefix="dmlh-test-cache-")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, on a machine without a CUDA GPU (``pytest -m cuda``
    on one runs them all; ``harness/bench/gpu_check.sh`` does, and prints the GPU figures)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda; run harness/bench/gpu_check.sh on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
