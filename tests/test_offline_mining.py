"""Offline triplet mining (methods/offline_mining.py, sampler.kind: triplets): the mined triplets against a
naive loop over the full distance matrix, the batches, the refresh schedule, a tiny run, the config errors
and the triplet-mining study at smoke scale."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from harness import config, registry, store, study
from harness.data.sampler import TripletSampler
from harness.errors import ConfigError, TrainingError
from harness.learner import check_assembly
from harness.train import _Trainer, run
from methods import offline_mining
from methods.distances import label_masks, pairwise_distance
from methods.miners import batch_hard_triplets
from tests.fixtures import make_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
    "sampler": {"kind": "triplets", "triplets": 4, "batches_per_epoch": 3},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
    "model": {"name": "embedder", "embedding_dim": 8},
    "loss": {"name": "triplet"},
    "miner": {"name": "offline"},
    "train": {"epochs": 2, "threads": 1},
    "eval": {"nmi": False},
}


def tiny(*overrides: str, raw: dict[str, Any] | None = None) -> config.RunConfig:
    base = config.name_default_components(raw if raw is not None else TINY)
    return config.validate(config.apply_overrides(base, list(overrides)))


def miner(**params: Any) -> offline_mining.OfflineTripletMiner:
    return registry.build("miner", "offline", **params)


def naive_triplets(
    emb: np.ndarray, labels: np.ndarray, strategy: str, positives: dict[int, int] | None, distance: str
) -> list[tuple[int, int, int]]:
    """The definitions one anchor at a time over the full N×N distance matrix (float64): the anchors are
    the images of classes with >= 2 images; positive: the farthest of the class (or the given one);
    negative: hard = the closest of another class; semi-hard = the closest of another class strictly
    farther than the positive, else the farthest of another class."""
    x = emb.astype(np.float64)
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    out = []
    for a in range(n):
        same = [j for j in range(n) if labels[j] == labels[a] and j != a]
        others = [j for j in range(n) if labels[j] != labels[a]]
        if not same or not others:
            continue
        p = max(same, key=lambda j: dist[a, j]) if positives is None else positives[a]
        if strategy == "hard":
            neg = min(others, key=lambda j: dist[a, j])
        else:
            farther = [j for j in others if dist[a, j] > dist[a, p]]
            neg = min(farther, key=lambda j: dist[a, j]) if farther else max(others, key=lambda j: dist[a, j])
        out.append((a, p, neg))
    return out


def random_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """60 points in 5-D: classes of 1 (never an anchor), 2, 7, 20 and 30 images, with class offsets so that
    neighbourhoods mix positives and negatives."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([4] + [0] * 2 + [1] * 7 + [2] * 20 + [3] * 30)
    labels = labels[torch.randperm(len(labels), generator=g)]
    emb = torch.randn(len(labels), 5, generator=g) + 0.8 * torch.randn(5, 5, generator=g)[labels]
    return emb, labels


def mined(m: offline_mining.OfflineTripletMiner, emb: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    triplets, stats = m.mine_split(emb, labels, np.random.default_rng(seed))
    return [tuple(t) for t in triplets.tolist()], stats


# -- the mined triplets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("strategy", ["hard", "semi_hard"])
@pytest.mark.parametrize("neighbours", [1, 4, 100])
def test_hardest_positive_triplets_equal_the_full_distance_matrix(
    strategy: str, distance: str, neighbours: int
) -> None:
    for seed in range(3):
        emb, labels = random_split(seed)
        got, stats = mined(miner(strategy=strategy, neighbours=neighbours, distance=distance), emb, labels)
        ref = "cosine" if distance == "cosine" else "euclidean"  # sqeuclidean: the same order
        assert got == naive_triplets(emb.numpy(), labels.numpy(), strategy, None, ref)
        assert stats["triplets"] == len(got) == 59  # every image but the single one is an anchor


def test_offline_hard_is_batch_hard_over_the_whole_split() -> None:
    """The same definition as the online batch-hard miner, applied to the split as one batch."""
    emb, labels = random_split(1)
    got, _ = mined(miner(strategy="hard", neighbours=2), emb, labels)
    online = batch_hard_triplets(pairwise_distance(emb, "euclidean"), *label_masks(labels))
    assert got == list(zip(*(t.tolist() for t in online), strict=True))


@pytest.mark.parametrize("strategy", ["hard", "semi_hard"])
def test_random_positive_triplets_equal_the_full_distance_matrix(strategy: str) -> None:
    emb, labels = random_split(2)
    m = miner(strategy=strategy, positive="random", neighbours=3)
    got, _ = mined(m, emb, labels, seed=5)
    assert got == mined(m, emb, labels, seed=5)[0]  # a function of the generator
    assert got != mined(m, emb, labels, seed=6)[0]
    positives = {a: p for a, p, _ in got}
    assert all(labels[a] == labels[p] and a != p for a, p in positives.items())
    assert got == naive_triplets(emb.numpy(), labels.numpy(), strategy, positives, "euclidean")


def test_random_positives_are_uniform_over_the_other_images_of_the_class() -> None:
    labels = torch.tensor([0] * 4 + [1] * 2)
    counts = np.zeros((6, 6))
    rng = np.random.default_rng(0)
    for _ in range(4000):
        p = offline_mining.random_positives(labels, torch.arange(6), rng)
        counts[np.arange(6), p.numpy()] += 1
    np.testing.assert_array_equal(np.diag(counts), 0)
    assert np.allclose(counts[:4, :4][~np.eye(4, dtype=bool)] / 4000, 1 / 3, atol=0.03)
    assert (counts[4, 5], counts[5, 4]) == (4000, 4000)


def test_semi_hard_on_a_line() -> None:
    """The rule of the online semi-hard miner (tests/test_miners.py), one triplet per anchor."""
    labels = torch.tensor([0, 0, 1, 1, 1])
    emb = torch.tensor([[x, 0.0] for x in (0, 1, 0.6, 2, 4)])
    got, stats = mined(miner(strategy="semi_hard", neighbours=1), emb, labels)
    assert got == [
        (0, 1, 3),  # D_ap = 1; negatives at 0.6, 2, 4: the closest farther is x=2
        (1, 0, 4),  # negatives at 0.4, 1 (= D_ap, not strictly farther), 3: x=4
        (2, 4, 0),  # D_ap = 3.4, no negative farther: the farthest, x=0
        (3, 4, 0),  # D_ap = 2, negatives at 2 (not strictly farther) and 1: the farthest, x=0
        (4, 2, 0),  # D_ap = 3.4; negatives at 4 and 3: x=0
    ]
    assert stats["farthest_fallback"] == pytest.approx(2 / 5)
    hard, _ = mined(miner(strategy="hard", neighbours=1), emb, labels)
    assert [n for _, _, n in hard] == [2, 2, 1, 1, 1]


def test_the_search_grows_only_for_anchors_that_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clustered classes: hard negatives come from searches far smaller than the split (never N×N)."""
    asked: list[tuple[int, int]] = []
    knn = offline_mining.knn

    def spy(gallery: torch.Tensor, k: int, query: torch.Tensor, **kw: Any) -> Any:
        asked.append((len(query), k))
        return knn(gallery, k, query, **kw)

    monkeypatch.setattr(offline_mining, "knn", spy)
    labels = torch.arange(40).repeat_interleave(10)
    emb = 5 * torch.randn(40, 16)[labels] + torch.randn(400, 16)
    got, stats = mined(miner(strategy="hard", neighbours=4), emb, labels)
    assert got == naive_triplets(emb.numpy(), labels.numpy(), "hard", None, "euclidean")
    assert asked == [(400, 5), (400, 9), (400, 17)]  # k = 4, 8, 16: a class's 9 other images first
    assert sum(q * k for q, k in asked) < 400 * 400 / 10
    assert 9 <= stats["neighbours"] <= 16 and stats["closer_negative"] == 0.0


def test_a_split_without_anchors_is_a_clear_error() -> None:
    with pytest.raises(TrainingError, match="no class with 2 images"):
        miner().mine_split(torch.randn(3, 2), torch.tensor([0, 1, 2]), np.random.default_rng(0))


# -- the batches -------------------------------------------------------------------------------------------


def test_the_batch_miner_returns_the_sampler_triplets_and_refuses_other_batches() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 0, 1, 1, 3])
    a, p, n = miner()(torch.randn(9, 4), labels)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0, 3, 6], [1, 4, 7], [2, 5, 8])
    with pytest.raises(TrainingError, match="sampler.kind: triplets"):
        miner()(torch.randn(8, 4), torch.arange(4).repeat_interleave(2))  # a P×K batch


def test_batches_hold_exactly_the_mined_triplets_each_used_evenly() -> None:
    triplets = np.arange(21).reshape(7, 3) * 10 + np.array([0, 1, 2])
    sampler = TripletSampler(n_images=300, triplets=4, batches_per_epoch=5, seed=3)
    assert len(sampler) == 5 and len(TripletSampler(300, 4)) == 25  # default: ~ an epoch's images
    with pytest.raises(TrainingError, match="no triplets yet"):
        next(iter(sampler))
    sampler.set_triplets(triplets, epoch=2)
    rows = {tuple(t) for t in triplets.tolist()}
    seen = []
    for epoch in (2, 3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 5 and all(len(b) == 12 for b in batches)
        seen += [tuple(t) for b in batches for t in np.reshape(b, (4, 3)).tolist()]
        assert batches == list(sampler)  # a function of (seed, refresh epoch, epoch)
    assert set(seen) <= rows
    counts = pd.Series(seen).value_counts()
    assert len(counts) == 7 and counts.max() - counts.min() <= 1  # 40 = 5 passes + 5: one pass after another


def test_the_trainer_refreshes_every_n_epochs_on_the_whole_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    mine_split = offline_mining.OfflineTripletMiner.mine_split

    def spy(self: Any, embeddings: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> Any:
        calls.append(len(embeddings))
        return mine_split(self, embeddings, labels, rng)

    monkeypatch.setattr(offline_mining.OfflineTripletMiner, "mine_split", spy)
    res = run(tiny("miner.refresh_every=2", "train.epochs=5", "miner.strategy=semi_hard"))
    n_train = 32  # 12 classes: 6 train (2 of them validate), 8 images each
    assert calls == [n_train] * 3  # epochs 1, 3, 5
    mining = [r["mining_s"] > 0 for r in res.history]
    assert mining == [True, False, True, False, True]
    assert [("mining/triplets" in r) for r in res.history] == mining
    assert all(r["mining/triplets"] == n_train for r in res.history if "mining/triplets" in r)
    assert all(r["train/loss/triplets"] == 4 for r in res.history)  # the loss sees the 4 triplets of a batch
    t = res.timings
    assert t["mining_s"] == pytest.approx(sum(r["mining_s"] for r in res.history))
    assert t["epoch_s"] == pytest.approx((t["train_s"] + t["mining_s"]) / 5)
    assert t["mining_epoch_s"] == pytest.approx(t["mining_s"] / 5)
    assert 0.0 <= res.metrics["test/recall@1"] <= 1.0


def test_an_offline_run_is_reproducible() -> None:
    a, b = run(tiny("miner.positive=random")), run(tiny("miner.positive=random"))
    assert a.metrics == b.metrics
    assert [r["train/loss"] for r in a.history] == [r["train/loss"] for r in b.history]


def test_online_runs_have_no_mining_columns() -> None:
    raw = copy.deepcopy(TINY)
    raw["sampler"], raw["miner"] = {"p": 3, "k": 4, "batches_per_epoch": 2}, None
    res = run(tiny("train.epochs=1", raw=raw))
    assert not any(k.startswith("mining") for k in res.history[0])
    assert res.timings["mining_s"] == 0.0 and res.timings["epoch_s"] == pytest.approx(res.timings["train_s"])


# -- config ------------------------------------------------------------------------------------------------


def test_offline_miner_and_triplet_sampler_come_together() -> None:
    with pytest.raises(ConfigError) as err:
        tiny("sampler.kind=pk")
    assert "miner: 'offline' mines triplets from the whole training split" in str(err.value)
    assert "sampler.kind: triplets (got sampler.kind: pk)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        tiny("miner=batch_hard")
    assert "sampler.kind: 'triplets' batches the triplets an offline miner mines" in str(err.value)
    assert "set miner: offline (got miner: batch_hard)" in str(err.value)
    with pytest.raises(ConfigError, match="got miner: none"):
        tiny("miner=none")
    with pytest.raises(ConfigError, match="sampler.repeated_augmentations: not with sampler.kind: triplets"):
        tiny("sampler.repeated_augmentations=2")
    with pytest.raises(ConfigError, match="sampler.triplets"):
        tiny("sampler.triplets=0")
    with pytest.raises(ConfigError, match=r"miner.strategy: 'hardest' is not a valid"):
        tiny("miner.strategy=hardest")
    # a loss that chooses its own triplets, or takes none, is refused before training
    assert any("loss.mining" in p for p in check_assembly(tiny("loss.mining=all")))
    with pytest.raises(ConfigError, match="miner: loss 'proxy_anchor' cannot take a miner"):
        tiny("loss=proxy_anchor")


def test_the_trainer_hands_the_loss_the_mined_triplets() -> None:
    tr = _Trainer(tiny())
    stats = tr.refresh_triplets(0)
    assert stats["mining/triplets"] == 32 and stats["mining_s"] > 0
    assert tr.refresh_triplets(1)["mining_s"] > 0  # refresh_every: 1
    tr.sampler.set_epoch(1)
    labels = np.asarray(tr.splits.train.labels)
    mined = {tuple(t) for t in tr.sampler.triplets.tolist()}
    for batch, (_, batch_labels) in zip(list(tr.sampler), tr.loader, strict=True):
        rows = np.reshape(batch, (-1, 3))
        assert {tuple(t) for t in rows.tolist()} <= mined
        np.testing.assert_array_equal(np.asarray(batch_labels), labels[batch])  # the loader's batch
        a, p, n = tr.learner.miner(torch.randn(len(batch), 8), torch.as_tensor(batch_labels))
        np.testing.assert_array_equal(np.asarray(batch)[torch.stack([a, p, n], 1).numpy()], rows)


# -- the study ---------------------------------------------------------------------------------------------


def test_the_triplet_mining_study_compares_offline_with_online_mining() -> None:
    spec = study.load_study(ROOT / "studies/triplet_mining.yaml")
    labels = [a.label for a in spec.arms]
    arms = ("all", "batch_hard", "semi_hard", "offline_hard", "offline_semi_hard")
    assert labels == [f"mining={m}" for m in arms]
    assert spec.baseline == "mining=batch_hard"
    offline = spec.config(spec.arm("mining=offline_semi_hard"), {})
    assert offline.sampler.kind == "triplets" and offline.miner is not None
    assert (offline.miner["strategy"], offline.miner["positive"]) == ("semi_hard", "random")
    assert spec.config(spec.arm("mining=semi_hard"), {}).miner is None


@pytest.mark.slow
def test_the_triplet_mining_study_runs_at_smoke_scale(tmp_path: Path) -> None:
    root = make_fashion_mnist(tmp_path / "fmnist", n_per_class=6)
    overrides = [
        f"base.data.dataset.root={root}",
        "base.data.dataset.max_per_class=12",
        "base.sampler.batches_per_epoch=2",
        "base.train.epochs=2",
        "base.train.threads=1",
        "base.eval.nmi=false",
        "tune.n_trials=1",
        "final.seeds=[0]",
    ]
    out = study.run_study(ROOT / "studies/triplet_mining.yaml", results=tmp_path, overrides=overrides)
    df = store.load("triplet_mining", results=tmp_path)
    final = df[(df.stage == "final") & (df.state == "COMPLETE")].set_index("arm")
    assert len(final) == 5
    offline = final.index.str.startswith("mining=offline")
    assert (final.loc[offline, "time/mining_epoch_s"] > 0).all()
    assert (final.loc[~offline, "time/mining_epoch_s"] == 0).all()
    assert out is not None
    budget = pd.read_csv(out / "tables" / "trials_per_arm.csv", index_col=0)
    assert {"s/epoch (final)", "mining s/epoch (final)"} <= set(budget.columns)
    assert (budget.loc[final.index[offline], "mining s/epoch (final)"] >= 0).all()
    history = store.read_history(final.loc["mining=offline_hard", "run_dir"])
    assert history is not None and (history["mining/triplets"] == 4 * 12).all()
    assert "## Trials per arm" in (out / "report.md").read_text()


def test_the_trials_table_shows_mining_time_only_for_a_study_that_mined() -> None:
    from harness.reporting.search import trials_per_arm

    rows = {"arm": ["a", "b"], "stage": ["final"] * 2, "state": ["COMPLETE"] * 2, "time/epoch_s": [2.0, 4.0]}
    online = pd.DataFrame({**rows, "time/mining_epoch_s": [0.0, 0.0]})
    assert list(trials_per_arm(online, ["a", "b"]).columns) == ["final COMPLETE", "s/epoch (final)"]
    mined = trials_per_arm(pd.DataFrame({**rows, "time/mining_epoch_s": [0.0, 1.5]}), ["a", "b"])
    assert mined["mining s/epoch (final)"].tolist() == [0.0, 1.5]
