"""ABE's learners scored alone (``test_learner<m>/…``) beside the ensemble: the run's metrics equal the
metrics of each learner's columns of the reported state's test embeddings, and the report's per-learner
table shows them per arm (mean ± std over seeds), as the ABE paper's individual-learners table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from harness import config, report, rundir, store
from harness.evaluate import retrieval_metrics
from harness.learner import embed
from harness.plugins import Ensemble
from harness.train import _Trainer, run


def _cfg(**model: object) -> config.RunConfig:
    return config.validate({
        "name": "abe-learners",
        "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
        "sampler": {"p": 3, "k": 4, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "model": {"name": "abe", "embedding_dim": 48, "branch": "block2", **model},
        "loss": {"name": "contrastive"},
        "train": {"epochs": 2},
        "eval": {"nmi": False, "ks": [1, 2], "whitening": {"name": "pca"}},
    })  # fmt: skip


def _test_embeddings(cfg: config.RunConfig, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw test embeddings of ``state`` (the run's checkpoint: the state its ``test/…`` report)."""
    tr = _Trainer(cfg)
    tr.load_state(state)
    return embed(tr.model, tr.eval_sets["test"], 64, torch.device("cpu"))


def _naive_recall_at_1(emb: torch.Tensor, labels: torch.Tensor, tie: float = 1e-6) -> tuple[float, float]:
    """Each item's nearest other item by cosine similarity (unit rows), one query at a time: the lowest and
    the highest Recall@1 that the order of near-ties (within ``tie``, float32's resolution) can give."""
    e, low, high, answerable = emb.double(), 0, 0, 0
    for i in range(len(e)):
        if (labels == labels[i]).sum() < 2:
            continue
        sims = e @ e[i]
        sims[i] = -np.inf
        hit = labels[sims >= sims.max() - tie] == labels[i]
        low, high, answerable = low + int(hit.all()), high + int(hit.any()), answerable + 1
    return low / answerable, high / answerable


@pytest.mark.parametrize("variant", ["attention", "heads"])
def test_each_learner_is_scored_on_its_own_unwhitened_columns(variant: str) -> None:
    cfg = _cfg(m=3, variant=variant)
    result = run(cfg)
    learner_keys = sorted(k for k in result.metrics if k.startswith("test_learner"))
    assert learner_keys == sorted(
        f"test_learner{m}/{k}" for m in (1, 2, 3) for k in ("recall@1", "recall@2", "map@r")
    )
    emb, labels = _test_embeddings(cfg, result.checkpoint)
    for m in range(3):
        part = emb[:, 16 * m : 16 * (m + 1)]
        torch.testing.assert_close(part.norm(dim=1), torch.ones(len(part)))
        want = retrieval_metrics(part, labels, ks=(1, 2), nmi=False)
        for k in ("recall@1", "recall@2", "map@r"):
            assert result.metrics[f"test_learner{m + 1}/{k}"] == pytest.approx(want[k], abs=1e-12)
        low, high = _naive_recall_at_1(part, labels)
        assert low <= result.metrics[f"test_learner{m + 1}/recall@1"] <= high and high - low < 0.1
    ensemble = retrieval_metrics(emb, labels, ks=(1, 2), nmi=False)  # the test/ numbers are whitened ones
    header = rundir.format_metrics(result).splitlines()[1].split()
    assert header[-3:] == ["test_learner1", "test_learner2", "test_learner3"]  # `dmlh run` prints them
    assert result.metrics["test/map@r"] != pytest.approx(ensemble["map@r"], abs=1e-9)


def test_one_learner_is_no_ensemble() -> None:
    result = run(_cfg(m=1, lambda_div=0.0))
    assert "test/recall@1" in result.metrics
    assert not any(k.startswith("test_learner") for k in result.metrics)


def test_abe_declares_its_learner_columns() -> None:
    tr = _Trainer(_cfg(m=3))
    assert isinstance(tr.model, Ensemble)
    assert tr.model.learner_columns() == [slice(0, 16), slice(16, 32), slice(32, 48)]


# -- the report's per-learner table ------------------------------------------------------------------------

ARMS = ["model=abe2", "model=abe3", "model=embedder"]
#: arm -> number of learners (0: not an ensemble)
LEARNERS = {ARMS[0]: 2, ARMS[1]: 3, ARMS[2]: 0}


def _r1(arm: int, learner: int, seed: int) -> float:
    """Learner ``learner``'s (0: the ensemble's) test recall@1 of ``arm``'s seed ``seed``."""
    return 0.3 + 0.1 * arm + (0.2 if learner == 0 else 0.02 * learner) + 0.01 * seed**2


def _write_store(results: Path, name: str, learners: dict[str, int]) -> None:
    storage = store.open_storage(None, name, results, create=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr(
        "meta",
        {
            "name": name,
            "factors": ["model"],
            "arms": [{"label": a, "values": {"model": a[6:]}, "display": {"model": a[6:]}} for a in learners],
            "baseline": ARMS[0],
            "seeds": [0, 1, 2],
            "metric": "recall@1",
            "n_trials": 0,
            "tune_params": [],
        },
    )
    for i, (arm, m) in enumerate(learners.items()):
        for seed in range(3):
            metrics = {"test/recall@1": _r1(i, 0, seed), "test/map@r": _r1(i, 0, seed) / 2}
            for j in range(1, m + 1):
                metrics[f"test_learner{j}/recall@1"] = _r1(i, j, seed)
                metrics[f"test_learner{j}/map@r"] = _r1(i, j, seed) / 2
            attrs = {"stage": "final", "arm": arm, "seed": seed, "arm_display": {"model": arm[6:]}}
            study.add_trial(
                optuna.trial.create_trial(value=_r1(i, 0, seed), user_attrs=attrs | {"metrics": metrics})
            )


def test_the_report_sets_each_learner_beside_the_ensemble(tmp_path: Path) -> None:
    _write_store(tmp_path, "abe", LEARNERS)
    folder = report.write_report("abe", results=tmp_path)
    table = pd.read_csv(folder / "tables/learners.csv", index_col=["arm", "metric"])
    assert list(table.index) == [(a, m) for a in ARMS[:2] for m in ("recall@1", "map@r")]
    assert list(table.columns) == [
        f"{n}_{s}" for n in ("learner1", "learner2", "learner3", "ensemble") for s in ("mean", "std")
    ]
    for i, arm in enumerate(ARMS[:2]):
        for j, name in [(1, "learner1"), (2, "learner2"), (3, "learner3"), (0, "ensemble")]:
            row = table.loc[(arm, "recall@1")]
            if j > LEARNERS[arm]:
                assert pd.isna(row[f"{name}_mean"]) and pd.isna(row[f"{name}_std"])
                continue
            seeds = pd.Series([_r1(i, j, s) for s in range(3)])
            assert (row[f"{name}_mean"], row[f"{name}_std"]) == pytest.approx((seeds.mean(), seeds.std()))
            assert table.loc[(arm, "map@r"), f"{name}_mean"] == pytest.approx(seeds.mean() / 2)
    md = (folder / "tables/learners.md").read_text()
    head = "| arm | metric | Learner 1 (%) | Learner 2 (%) | Learner 3 (%) | Ensemble (%) |"
    assert head in md
    # abe2 seeds 0, 1, 2: learner 1 = 32, 33, 36 %; ensemble 50, 51, 54 %; no learner 3
    assert "| Abe2 | Recall@1 | 33.7 ± 2.1 | 35.7 ± 2.1 |  | 51.7 ± 2.1 |" in md  # arms by their titles
    assert "model=embedder" not in md
    assert "33.7 $\\pm$ 2.1" in (folder / "tables/learners.tex").read_text()
    overview = (folder / "report.md").read_text()
    assert overview.index("## Comparison") < overview.index("## Per-learner Recall@K")
    assert "| Abe3 | Recall@1 |" in overview
    assert "Per-learner Recall@K" in (folder / "report.html").read_text()


def test_a_study_without_ensembles_has_no_per_learner_table(tmp_path: Path) -> None:
    _write_store(tmp_path, "plain", {ARMS[2]: 0})
    folder = report.write_report("plain", results=tmp_path)
    assert not (folder / "tables/learners.csv").exists()
    assert "Per-learner" not in (folder / "report.md").read_text()
