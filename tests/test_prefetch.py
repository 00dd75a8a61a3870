"""harness.data.prefetch.ThreadedLoader: the loader's batches in its order, its errors raised where they are
consumed, an epoch left early stops the thread; training with DataLoader workers on the CPU uses it."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from harness import config
from harness.data.prefetch import ThreadedLoader
from harness.train import _Trainer, run
from tests.fixtures import make_cub200


class _Numbers(torch.utils.data.Dataset):
    """Item i is i; item ``bad`` raises (as a file that cannot be decoded does)."""

    def __init__(self, n: int, bad: int | None = None):
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.bad:
            raise OSError(f"item {i} cannot be read")
        return i


def _loader(dataset: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, persistent_workers=True)


def _threads() -> int:
    return sum(t.name == "dmlh-loader" for t in threading.enumerate())


def test_yields_the_loaders_batches_in_order_epoch_after_epoch() -> None:
    loader = _loader(_Numbers(10))
    threaded = ThreadedLoader(loader, depth=2)
    assert len(threaded) == len(loader) == 4
    expected = [b.tolist() for b in loader]
    for _ in range(2):
        assert [b.tolist() for b in threaded] == expected
    assert _threads() == 0


def test_an_error_of_the_loader_is_raised_in_the_consumer() -> None:
    threaded = ThreadedLoader(_loader(_Numbers(10, bad=7)))
    seen = []
    with pytest.raises(OSError, match="item 7 cannot be read"):
        for batch in threaded:
            seen += batch.tolist()
    assert seen == [0, 1, 2, 3, 4, 5] and _threads() == 0


def test_leaving_an_epoch_early_stops_the_thread_and_the_next_epoch_starts_afresh() -> None:
    threaded = ThreadedLoader(_loader(_Numbers(30)), depth=1)
    for batch in threaded:
        assert batch.tolist() == [0, 1, 2]
        break
    assert _threads() == 0  # joined: the loader is never iterated by two threads at once
    assert next(iter(threaded)).tolist() == [0, 1, 2]


def test_training_with_workers_on_the_cpu_receives_in_a_thread_and_stays_reproducible(tmp_path: Path) -> None:
    root = make_cub200(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per_class=4, size=40)
    raw = {
        "data": {"dataset": {"name": "cub200", "root": str(root)}, "cache": "memory", "num_workers": 1},
        "sampler": {"p": 2, "k": 2, "batches_per_epoch": 3},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
        "model": {"name": "embedder", "embedding_dim": 8},
        "train": {"epochs": 2},
        "eval": {"nmi": False},
    }
    cfg = config.validate(raw)
    assert isinstance(_Trainer(cfg).loader, ThreadedLoader)
    raw["data"]["num_workers"] = 0
    assert isinstance(_Trainer(config.validate(raw)).loader, torch.utils.data.DataLoader)
    first, again = run(cfg), run(cfg)  # the workers' crops (CachedCrop): their draws are seeded by the run
    losses = [h["train/loss"] for h in first.history]
    assert np.isfinite(losses).all() and losses == [h["train/loss"] for h in again.history]
    assert first.metrics == again.metrics


def test_embedding_a_split_with_workers_gives_the_embeddings_without(tmp_path: Path) -> None:
    from harness.learner import embed

    data = torch.utils.data.TensorDataset(torch.randn(23, 5), torch.arange(23))
    model = torch.nn.Linear(5, 4)

    class _Model(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return SimpleNamespace(embeddings=model(x))

    alone = embed(_Model(), data, 4, torch.device("cpu"), num_workers=0)
    threaded = embed(_Model(), data, 4, torch.device("cpu"), num_workers=1)
    torch.testing.assert_close(alone, threaded)
