"""One trial across 2 processes (DDP, gloo on the CPU): the gathered global batch gives the loss, gradients,
weights and metrics of one process; failures and stops end every rank, never a hang.

Each test spawns its 2 ranks once (a spawn costs seconds); the ranks run functions of this module, found by
its import name. Augmentation draws per rank, so the run-level comparisons switch it off in every process
(the ``_no_augmentation`` hook): the per-item transforms of a shard would draw other numbers than those of
the whole batch in one process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
import torch

from harness import config, distributed
from harness import train as train_module
from harness.distributed import SINGLE, Dist, launch
from harness.errors import ConfigError, TrainingError
from harness.learner import Learner
from harness.train import run

HOOK = f"{__name__}:_hook"

#: tiny, frozen BN (PyTorch's SyncBatchNorm is GPU-only), no dropout: the comparison is exact
BASE: dict[str, Any] = {
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8, "frozen_bn": True},
    "model": {"name": "embedder", "embedding_dim": 8},
    "sampler": {"p": 4, "k": 4},
}
CASES: dict[str, dict[str, Any]] = {
    "triplet_batch_all": {"loss": {"name": "triplet", "mining": "all"}},
    "triplet_batch_hard": {"loss": {"name": "triplet", "mining": "batch_hard"}},
    "triplet_semi_hard": {"loss": {"name": "triplet", "mining": "semi_hard"}},
    "triplet_batch_all_miner": {"loss": {"name": "triplet"}, "miner": {"name": "batch_all"}},
    "multi_similarity": {"loss": {"name": "multi_similarity"}},
    "contrastive": {"loss": {"name": "contrastive"}},
    "npair": {"loss": {"name": "npair"}},
    "proxy_anchor": {"loss": {"name": "proxy_anchor"}},
    "symmetrical_synthesis": {"loss": {"name": "triplet"}, "synthesis": {"name": "symmetrical"}},
    "mdr": {
        "model": {"name": "embedder", "embedding_dim": 8, "normalize": "mean_distance"},
        "loss": {"name": "triplet", "mining": "batch_hard"},
        "regularizers": [{"name": "mdr"}],
    },
    "abe_m2": {
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 16, "frozen_bn": True},
        "model": {"name": "abe", "m": 2, "embedding_dim": 8, "lambda_div": 1.0},
        "loss": {"name": "contrastive"},
    },
}


def _cfg(raw: dict[str, Any], *overrides: str) -> config.RunConfig:
    merged = {**BASE, **raw}
    return config.validate(config.apply_overrides(config.name_default_components(merged), list(overrides)))


def _batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A P×K global batch of 16 images (4 classes × 4), float64."""
    size = CASES[name].get("backbone", BASE["backbone"])["input_size"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, size, size, generator=g, dtype=torch.float64), torch.arange(
        4
    ).repeat_interleave(4)


def _step(dist: Dist, name: str) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """One step of ``CASES[name]`` through the real Learner objective on this rank's shard: the loss, every
    parameter's gradient (averaged over ranks as training does) and the statistics."""
    cfg = _cfg(CASES[name])
    torch.manual_seed(0)
    learner = Learner.build(cfg, num_classes=4, in_channels=1, device=torch.device("cpu"))
    learner.model.double()
    learner.global_batch = dist.global_batch
    for module in (learner.model, learner.loss, learner.regularizers):
        module.train()
    images, labels = _batch(name)
    n = len(labels) // dist.world_size
    shard = slice(dist.rank * n, (dist.rank + 1) * n)
    total, stats = learner.objective(images[shard], labels[shard])
    total.backward()
    params = [p for g in learner.optimizer.param_groups for p in g["params"]]
    dist.average_gradients(params)
    grads = {
        f"{root}.{k}": p.grad.clone()
        for root, module in (("model", learner.model), ("loss", learner.loss), ("reg", learner.regularizers))
        for k, p in module.named_parameters()
        if p.grad is not None
    }
    return float(total.detach()), grads, {k: float(v) for k, v in stats.items()}


def _grad_job(dist: Dist) -> dict[str, Any]:
    """In each rank: one step of every case, and the embeddings of an uneven split gathered from shards."""
    out: dict[str, Any] = {name: _step(dist, name) for name in CASES}
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    data = torch.utils.data.TensorDataset(torch.randn(37, 3), torch.arange(37))

    def embed_set(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[ds[i] for i in range(len(ds))], strict=True)  # type: ignore[arg-type]
        return model(torch.stack(xs)).detach(), torch.stack(ys)

    out["embed"] = dist.embed(embed_set, data, 8, 4)
    out["embed_small"] = dist.embed(embed_set, torch.utils.data.Subset(data, range(3)), 8, 4)
    out["on_main"] = dist.on_main(lambda: {"rank": dist.rank})
    return out


def test_every_loss_gradient_and_eval_gather_equal_one_process() -> None:
    got = launch(_grad_job, (), world_size=2, timeout_s=120)
    for name in CASES:
        loss, grads, stats = _step(SINGLE, name)
        loss2, grads2, stats2 = got[name]
        assert loss2 == pytest.approx(loss, rel=1e-5), name
        assert grads.keys() == grads2.keys() and grads, name
        # the losses run in float32: an absolute tolerance on the scale of the largest gradient covers the
        # rounding noise of gradients that are zero in exact arithmetic (a bias before mean-distance scaling)
        atol = 1e-5 * max(float(g.abs().max()) for g in grads.values())
        for k, g in grads.items():
            torch.testing.assert_close(grads2[k], g, rtol=1e-5, atol=atol, msg=f"{name}: {k}")
        assert stats.keys() == stats2.keys(), name
        for k, v in stats.items():
            assert stats2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"{name}: {k}"
    # evaluation: shards of whole batches (37 items, batch 8: 2 + 3 batches), and items when batches are few
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = torch.randn(37, 3)
    emb, labels = got["embed"]
    torch.testing.assert_close(emb, model(x).detach())
    assert labels.tolist() == list(range(37))
    emb3, labels3 = got["embed_small"]
    torch.testing.assert_close(emb3, model(x[:3]).detach())
    assert labels3.tolist() == [0, 1, 2]
    assert got["on_main"] == {"rank": 0}  # computed on rank 0, every rank has it


def test_shards_are_contiguous() -> None:
    """Evaluation shards are whole batches where every rank gets one, else items; training shards slice
    every global batch."""
    assert distributed.eval_shard(37, 8, 0, 2) == (0, 16) and distributed.eval_shard(37, 8, 1, 2) == (16, 37)
    assert distributed.eval_shard(3, 8, 0, 2) == (0, 2) and distributed.eval_shard(3, 8, 1, 2) == (2, 3)
    sampler = distributed.ShardedBatches([[0, 1, 2, 3], [4, 5, 6, 7]], 1, 2)
    assert list(sampler) == [[2, 3], [6, 7]]


# -- whole runs ---------------------------------------------------------------------------------------------


def _no_augmentation() -> None:
    original = train_module.build_transforms

    def test_transform_only(*args: Any) -> Any:
        _, test = original(*args)
        return test, test

    train_module.build_transforms = test_transform_only  # type: ignore[assignment]


def _hook(rank: int) -> None:
    """Run in every spawned rank before it starts (``distributed.HOOK_ENV``)."""
    _no_augmentation()
    if os.environ.get("TEST_RANK_DIES") == str(rank):
        original, calls = Learner.objective, [0]

        def dies(self: Learner, images: torch.Tensor, labels: torch.Tensor) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                os._exit(7)  # as a rank that is killed: no message, no clean-up
            return original(self, images, labels)

        Learner.objective = dies  # type: ignore[method-assign]


DIGITS = [
    "data.dataset.name=digits",
    "data.val_fraction=0.4",
    "sampler.p=3",
    "sampler.batches_per_epoch=10",
    "train.epochs=2",
    "train.eval_every=2",  # validated at the last epoch only: its state is the checkpoint (20 steps)
    "eval.nmi=false",
]


def test_two_ranks_train_and_evaluate_as_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.HOOK_ENV, HOOK)
    monkeypatch.setattr(train_module, "build_transforms", train_module.build_transforms)
    _no_augmentation()
    cfg = _cfg(CASES["triplet_batch_hard"], *DIGITS)
    one = run(cfg)
    two = run(_cfg(CASES["triplet_batch_hard"], *DIGITS, "train.distributed.world_size=2"))
    assert two.run_key != one.run_key and two.best_epoch == one.best_epoch == 2
    assert two.metrics.keys() == one.metrics.keys()
    for k, v in one.metrics.items():
        assert two.metrics[k] == pytest.approx(v, abs=1e-6), k
    for a, b in zip(one.history, two.history, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    assert one.checkpoint is not None and two.checkpoint is not None
    for k, w in one.checkpoint["model"].items():  # the weights after 20 steps
        torch.testing.assert_close(two.checkpoint["model"][k], w, rtol=1e-4, atol=1e-6, msg=k)
    # the test neighbours: the same lists, up to near-ties swapped by float rounding (weights agree to 1e-4)
    a, b = one.embeddings["neighbours"], two.embeddings["neighbours"]
    assert (a == b).mean() > 0.999
    assert np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)]) > 0.999


def test_a_rank_that_dies_fails_the_run_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.HOOK_ENV, HOOK)
    monkeypatch.setenv("TEST_RANK_DIES", "1")
    t = time.monotonic()
    with pytest.raises(TrainingError, match=r"rank 1 failed: died \(exit code 7\)") as e:
        run(_cfg(CASES["triplet_batch_hard"], *DIGITS, "train.distributed.world_size=2"))
    assert "\n" not in str(e.value)
    assert time.monotonic() - t < 60


class _Prune(Exception):
    pass


def _pruned_trial() -> list[Any]:
    """A study worker's trial: a 2-rank run whose reporter (the pruner) stops it at the first validation."""
    seen: list[Any] = []

    def reporter(epoch: int, val: dict[str, float]) -> None:
        seen.append(epoch)
        raise _Prune(f"pruned at {epoch}")

    cfg = _cfg(CASES["triplet_batch_hard"], *DIGITS, "train.eval_every=1", "train.distributed.world_size=2")
    try:
        run(cfg, reporter)
    except _Prune as e:
        seen.append(str(e))
    return seen


def test_the_reporter_stops_every_rank_in_a_study_worker() -> None:
    """Rank 0's reporter runs in the caller; its exception stops every rank and reaches the caller. The
    caller is a loky worker process, as in ``dmlh study run`` (whose start method the ranks must not use)."""
    from joblib.externals.loky import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1) as pool:
        assert pool.submit(_pruned_trial).result(timeout=120) == [1, "pruned at 1"]


def test_a_batch_that_does_not_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="world_size: 3 ranks cannot share the global batch of 16"):
        _cfg(CASES["contrastive"], "train.distributed.world_size=3")
    raw = _cfg(CASES["contrastive"]).to_dict()
    raw["train"]["distributed"]["world_size"] = 3
    cfg = config.RunConfig.model_validate(raw)  # not validated: run() still refuses before loading data
    with pytest.raises(ConfigError, match="pick a batch divisible by 3"):
        run(cfg)
