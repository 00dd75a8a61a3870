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
