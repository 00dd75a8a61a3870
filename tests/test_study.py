"""The study runner: search space, validation, resume after a killed worker, failures, parallel workers."""

from __future__ import annotations

import copy
import os
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial, TrialState

from harness import config, store, study, train
from harness.errors import ConfigError, TrainingError

TINY_BASE: dict[str, Any] = {
    "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
    "sampler": {"p": 3, "k": 4, "batches_per_epoch": 2},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
    "model": {"name": "embedder", "embedding_dim": 8},
    "loss": {"name": "triplet", "mining": "batch_hard"},
    "train": {"epochs": 1, "threads": 1},
    "eval": {"nmi": False},
}


def tiny_study(name: str = "tiny", **sections: Any) -> dict[str, Any]:
    return {"name": name, "base": copy.deepcopy(TINY_BASE), "final": {"seeds": [0, 1]}, **sections}


def write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_by_study(name: str, results: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    _, _, storage = store.resolve(name, None, results)
    return {
        s: optuna.load_study(study_name=s, storage=storage).get_trials()
        for s in store.study_names(storage, name)
    }


def complete_units(trials: list[optuna.trial.FrozenTrial]) -> Counter[str]:
    return Counter(t.user_attrs["unit"] for t in trials if t.state == TrialState.COMPLETE)


# -- the search space --------------------------------------------------------------------------------------


def test_arms_are_the_product_of_the_factors_with_readable_labels() -> None:
    spec = study.parse_study(
        tiny_study(
            arms={
                "loss": [
                    {"name": "triplet", "mining": "batch_hard"},
                    {"name": "triplet", "mining": "all"},
                    {"name": "multi_similarity"},
                ],
                "synthesis": [None, "symmetrical"],
            }
        )
    )
    labels = [a.label for a in spec.arms]
    assert len(labels) == 6 == len(set(labels))
    assert labels[0] == "loss=triplet(mining=batch_hard), synthesis=none"
    assert "loss=multi_similarity, synthesis=symmetrical" in labels
    cfg = spec.config(spec.arm("loss=multi_similarity, synthesis=symmetrical"), {"seed": 3})
    assert cfg.loss["name"] == "multi_similarity" and cfg.synthesis["name"] == "symmetrical" and cfg.seed == 3
    assert cfg.sampler.p == 3  # the base is kept
    units = spec.units()
    assert len(units) == 6 * 2 and all(u.attrs["stage"] == "final" for u in units)


def test_excluded_combinations_are_left_out_and_bad_exclusions_reported() -> None:
    arms = {"model.embedding_dim": [8, 16], "optimizer.lr": [1e-3, 1e-2]}
    exclude = [{"model.embedding_dim": 8, "optimizer.lr": 1e-2}]
    spec = study.parse_study(tiny_study(arms=arms, exclude=exclude))
    assert [a.label for a in spec.arms] == ["embedding_dim=8, lr=0.001", "embedding_dim=16, lr=0.001",
                                            "embedding_dim=16, lr=0.01"]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        study.parse_study(tiny_study(arms=arms, exclude=[{"model.m": 1}, {"optimizer.lr": 0.5}]))
    assert "exclude[0].model.m: not a factor" in str(err.value)
    assert "exclude[1].optimizer.lr: 0.5 is not one of its levels" in str(err.value)


def test_factor_on_a_default_component_and_list_values() -> None:
    spec = study.parse_study(tiny_study(arms={"optimizer.lr": [1e-3, 1e-2], "eval.ks": [[1, 2], [1, 2, 4]]}))
    assert [a.label for a in spec.arms][:2] == ["lr=0.001, ks=[1,2]", "lr=0.001, ks=[1,2,4]"]
    cfg = spec.config(spec.arms[-1], {})
    assert cfg.optimizer == {**cfg.optimizer, "name": "adam", "lr": 1e-2} and cfg.eval.ks == [1, 2, 4]


def test_nmi_is_an_objective_only_where_it_selects_the_epoch() -> None:
    spec = tiny_study(objective={"metric": "nmi"})
    spec["base"]["eval"]["nmi"] = True
    with pytest.raises(ConfigError, match="for nmi set train.selection_metric: nmi"):
        study.parse_study(spec)
    spec["base"]["train"]["selection_metric"] = "nmi"
    assert study.parse_study(spec).metric == "nmi"


def test_regularizer_lists_that_differ_in_params_get_distinct_labels() -> None:
    mdr = [{"name": "mdr", "levels": levels} for levels in ([0.0], [-3.0, 0.0, 3.0])]
    arms = {"regularizers": [[], [mdr[0]], [mdr[1]]]}
    spec = study.parse_study(tiny_study(arms=arms, baseline={"regularizers": []}))
    assert [a.label for a in spec.arms] == [
        "regularizers=[]",
        "regularizers=[mdr(levels=[0])]",
        "regularizers=[mdr(levels=[-3,0,3])]",
    ]
    assert spec.config(spec.arms[2], {}).regularizers[0]["levels"] == [-3.0, 0.0, 3.0]


def test_a_factor_of_named_variants_sets_several_paths_per_level() -> None:
    arms = {
        "method": {
            "plain": {"loss": {"name": "contrastive"}},
            "hard": {"loss.mining": "batch_hard", "loss.margin": 0.3},
        },
        "model.embedding_dim": [4, 8],
    }
    spec = study.parse_study(tiny_study(arms=arms, baseline={"method": "plain", "model.embedding_dim": 8}))
    assert [a.label for a in spec.arms] == [
        "method=plain, embedding_dim=4",
        "method=plain, embedding_dim=8",
        "method=hard, embedding_dim=4",
        "method=hard, embedding_dim=8",
    ]
    assert spec.baseline == "method=plain, embedding_dim=8" and spec.factors == [
        "method",
        "model.embedding_dim",
    ]
    plain, hard = spec.config(spec.arms[1], {}), spec.config(spec.arms[3], {})
    assert plain.loss["name"] == "contrastive" and "mining" not in plain.loss  # a new component, its defaults
    assert (hard.loss["name"], hard.loss["mining"], hard.loss["margin"]) == ("triplet", "batch_hard", 0.3)
    assert spec.arms[3].values == {"method": "hard", "model.embedding_dim": 8}
    bad = {"method": {"plain": {"loss": "contrastive"}, "odd": 3, "typo": {"loss.margn": 0.1}}}
    with pytest.raises(ConfigError) as err:
        study.parse_study(tiny_study(arms=bad))
    assert (
        "arms.method.odd: a variant is a mapping of dotted config paths to values, got 3"
        in err.value.problems
    )
    assert any(p.startswith("arms (method=typo): loss.margn: unknown parameter") for p in err.value.problems)


def test_tune_distributions_and_conditional_params() -> None:
    spec = study.parse_study(
        tiny_study(
            arms={"loss": [{"name": "triplet"}, {"name": "multi_similarity"}]},
            tune={
                "n_trials": 3,
                "params": {
                    "optimizer.lr": {"low": "1e-4", "high": 1e-2, "log": True},
                    "loss.margin": {"low": 0.05, "high": 0.5, "when": {"loss.name": "triplet"}},
                    "sampler.k": [2, 4],
                    "model.embedding_dim": {"low": 8, "high": 16, "step": 8},
                },
            },
        )
    )
    dists = {p.path: p.distribution for p in spec.params}
    assert dists["optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["loss.margin"] == FloatDistribution(0.05, 0.5)
    assert dists["sampler.k"] == CategoricalDistribution([2, 4])
    assert dists["model.embedding_dim"] == IntDistribution(8, 16, step=8)
    values = {"optimizer.lr": 1e-3, "loss.margin": 0.3, "sampler.k": 4, "model.embedding_dim": 16}
    triplet, ms = spec.arms
    assert spec.suggest(FixedTrial(values), triplet) == values
    assert spec.suggest(FixedTrial(values), ms) == {k: v for k, v in values.items() if k != "loss.margin"}
    cfg = spec.config(triplet, values)
    assert (cfg.loss["margin"], cfg.sampler.k, cfg.optimizer["lr"]) == (0.3, 4, 1e-3)
    tune_units = [u for u in spec.units() if u.attrs["stage"] == "tune"]
    assert len(tune_units) == 2 * 3 and len({u.study for u in tune_units}) == 2  # one Optuna study per arm


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    top = tiny_study(
        arms={"synthesis": [], "loss.mining": ["all"]},
        timeout=-1,
        extra_key=1,
        tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 1.0, "high": 0.1}}},
    )
    top["base"]["train"]["epochs"] = "many"
    with pytest.raises(ConfigError) as err:
        study.parse_study(top)
    assert len(err.value.problems) == 5
    for expected in (
        "arms.synthesis: give a non-empty list of values or a mapping of named variants, got []",
        "timeout:",
        "extra_key: unknown key",
        "tune.params.optimizer.lr: `low <= high`",
        "base.train.epochs: Input should be a valid integer",
    ):
        assert any(p.startswith(expected) for p in err.value.problems), expected

    with pytest.raises(ConfigError, match="tune.params: empty"):
        study.parse_study(tiny_study(tune={"n_trials": 2}))

    arms = tiny_study(
        arms={"loss.name": ["triplet", "tripplet"], "train.epoch": [1]},
        tune={
            "n_trials": 2,
            "params": {
                "sampler.kk": [2, 4],
                "optimizer.lr": {"low": 1e-3, "high": 1e-2, "bad": 1},
                "loss.margin": {"low": 0.1, "high": 0.2, "when": {"loss.name": "npair"}},
            },
        },
        objective={"metric": "recall@3"},
    )
    with pytest.raises(ConfigError) as err:
        study.parse_study(arms)
    text = "\n".join(err.value.problems)
    for expected in (
        "arms (loss=tripplet, epoch=1): loss.name: unknown loss 'tripplet'; did you mean 'triplet'?",
        "arms.train.epoch: unknown key",
        "tune.params: sampler.kk: unknown key",
        "tune.params.optimizer.lr.bad: unknown key; (valid: low, high, log, step, choices, when)",
        "tune.params.loss.margin.when: {'loss.name': 'npair'} holds for no arm",
        "objective.metric: 'recall@3' is not a validation metric",
    ):
        assert expected in text, expected


def test_problems_only_assembly_shows_are_reported_before_running() -> None:
    """A stage name or a component combination is checked by building every arm (without weights)."""
    spec = tiny_study(
        arms={"model.branch": ["block2", "block9"]},
        base={**TINY_BASE, "model": {"name": "abe", "m": 2, "embedding_dim": 8}},
    )
    with pytest.raises(ConfigError) as err:
        study.parse_study(spec)
    assert err.value.problems == [
        "arms (branch=block9): model.branch 'block9' is not a stage of SmallConvNet "
        "(stages: block1, block2, block3, block4)"
    ]


def test_the_readme_study_reference_is_a_valid_study() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"Every key of a study YAML:\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    spec = study.parse_study(config.parse_yaml(block.replace("base: {...}", "base: {}")))
    # 2 × 2 × 2 arms less the 2 of synthesis=symmetrical, head=mdr (exclude)
    assert len(spec.arms) == 8 - 2 and spec.baseline == "loss=triplet, synthesis=none, head=l2"
    assert [p.path for p in spec.params] == ["optimizer.lr", "loss.margin", "sampler.k"]


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].glob("studies/*.yaml")), ids=lambda p: p.stem
)
def test_ready_studies_are_valid(path: Path) -> None:
    spec = study.load_study(path)
    assert spec.name == path.stem and spec.arms and len(spec.seeds) >= 3
    assert all(spec.config(arm, {}).data.val_fraction > 0 for arm in spec.arms)


# -- running ---------------------------------------------------------------------------------------------


def test_study_runs_tunes_per_arm_and_a_rerun_skips_finished_work(tmp_path: Path) -> None:
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    )
    path = write(tmp_path, spec)
    study.run_study(path, results=tmp_path, report=False)
    trials = trials_by_study("tiny", tmp_path)
    assert set(trials) == {"tiny", "tiny/tune/mining=batch_hard", "tiny/tune/mining=all"}
    for sname, ts in trials.items():
        expected = (
            {"tune/0", "tune/1"}
            if "/tune/" in sname
            else {f"{a}/seed={s}" for a in ("mining=batch_hard", "mining=all") for s in (0, 1)}
        )
        assert complete_units(ts) == Counter(expected)
    for t in trials["tiny"]:  # the final config is the arm's best tune config, with the seed
        tune = trials[f"tiny/tune/{t.user_attrs['arm']}"]
        best = max(tune, key=lambda u: u.value)
        assert t.user_attrs["tuned"] == best.user_attrs["tuned"] == best.params
        # never the tune run itself, even for its seed: a tune run has no test metrics (eval.test: false)
        assert t.user_attrs["run_key"] != best.user_attrs["run_key"] and "reused_from" not in t.user_attrs
        assert not any(k.startswith("test") for k in best.user_attrs["metrics"])
        assert (
            "test/recall@1" in t.user_attrs["metrics"]
            and (tmp_path / "tiny/runs" / t.user_attrs["run_key"] / "metrics.json").is_file()
        )
    study.run_study(path, results=tmp_path, report=False)
    assert {s: len(ts) for s, ts in trials_by_study("tiny", tmp_path).items()} == {
        s: len(ts) for s, ts in trials.items()
    }
    # a changed base config is another study's results: refused, with the way out
    with pytest.raises(ConfigError, match="--name"):
        study.run_study(path, results=tmp_path, report=False, overrides=["base.train.epochs=2"])


def test_failures_are_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    spec = tiny_study(
        arms={"optimizer": [{"name": "adam", "lr": 1e-3}, {"name": "sgd", "lr": 1e30}]}, final={"seeds": [0]}
    )
    spec["base"]["model"]["normalize"] = "none"
    with pytest.raises(
        study.StudyIncompleteError, match=r"1 arm\(s\) have no completed final run: optimizer=sgd"
    ):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    trials = {t.user_attrs["arm"]: t for t in trials_by_study("tiny", tmp_path)["tiny"]}
    ok, nan = trials["optimizer=adam"], trials["optimizer=sgd"]
    assert ok.state == TrialState.COMPLETE
    assert nan.state == TrialState.FAIL and nan.user_attrs["reason"].startswith("NonFiniteLossError")
    assert "Traceback" in nan.user_attrs["traceback"]
    failed = yaml.safe_load((tmp_path / "tiny/runs" / nan.user_attrs["run_key"] / "failed.json").read_text())
    assert failed["reason"] == nan.user_attrs["reason"]


def test_the_study_stops_when_most_trials_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(config: Any, reporter: Any = None) -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "run", oom)
    spec = tiny_study(arms={"loss.mining": ["batch_hard", "all", "semi_hard"]})
    with pytest.raises(TrainingError, match="4 of the 4 trials .* failed.*CUDA out of memory"):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    states = Counter(t.state for t in trials_by_study("tiny", tmp_path)["tiny"])
    assert states == {TrialState.FAIL: 4, TrialState.WAITING: 2}


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_tune_trials_below_the_median_are_pruned_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pruner: str
) -> None:
    """Each tune trial reports validation values that get worse trial after trial: once the pruner has its
    start-up trials, the later ones are stopped at their first epochs and stored as PRUNED with the reason;
    final runs are never pruned."""
    real_run, calls = train.run, []

    def declining(config: Any, reporter: Any = None) -> Any:
        calls.append(config)
        score = 1.0 - 0.1 * len(calls)
        for epoch in range(1, 4):
            reporter(epoch, {"recall@1": score})
        return real_run(config)

    monkeypatch.setattr(train, "run", declining)
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard"]},
        tune={"n_trials": 6, "pruner": pruner, "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2}}},
        final={"seeds": [0, 1]},
    )
    study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    trials = trials_by_study("tiny", tmp_path)
    tune = trials["tiny/tune/mining=batch_hard"]
    pruned = [t for t in tune if t.state == TrialState.PRUNED]
    assert pruned and tune[0].state == tune[1].state == TrialState.COMPLETE
    assert all(t.user_attrs["reason"].startswith("pruned at epoch") for t in pruned)
    assert all(t.state == TrialState.COMPLETE for t in trials["tiny"])  # the final stage is never pruned
    df = store.load("tiny", results=tmp_path)
    assert (df.state == "PRUNED").sum() == len(pruned)


def test_the_timeout_stops_starting_trials_and_a_rerun_finishes_the_study(tmp_path: Path) -> None:
    path = write(tmp_path, tiny_study(arms={"loss.mining": ["batch_hard", "all"]}, timeout=1e-9))
    with pytest.raises(study.StudyIncompleteError, match="2 arm"):  # non-zero exit, one line
        study.run_study(path, results=tmp_path, report=False)
    assert complete_units(trials_by_study("tiny", tmp_path)["tiny"]) == Counter()  # past the deadline at once
    study.run_study(path, results=tmp_path, report=False, overrides=["timeout=null"])
    assert sum(complete_units(trials_by_study("tiny", tmp_path)["tiny"]).values()) == 4


def test_sqlite_is_refused_for_several_workers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one worker"):
        study.run_study(
            write(tmp_path, tiny_study()), storage=f"sqlite:///{tmp_path}/s.db", workers=2, results=tmp_path
        )


def test_sqlite_storage_with_one_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study.run_study(
        write(tmp_path, tiny_study(final={"seeds": [0]})), storage=url, results=tmp_path, report=False
    )
    df = store.load("tiny", storage=url, results=tmp_path)
    assert list(df.state) == ["COMPLETE"] and df.attrs["meta"]["arms"][0]["label"] == "base"


@pytest.mark.slow
def test_two_workers_on_the_journal_run_every_unit_once(tmp_path: Path) -> None:
    seeds = [0, 1, 2, 3]
    spec = tiny_study(arms={"loss.mining": ["batch_hard", "all"]}, final={"seeds": seeds})
    spec["base"]["sampler"]["batches_per_epoch"] = 120  # enough work for the second worker to join in
    study.run_study(write(tmp_path, spec), workers=2, results=tmp_path, report=False)
    trials = trials_by_study("tiny", tmp_path)["tiny"]
    units = {f"{a}/seed={s}" for a in ("mining=batch_hard", "mining=all") for s in seeds}
    assert complete_units(trials) == Counter(units)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    pids = Counter(t.user_attrs["worker"]["pid"] for t in trials)
    assert len(pids) == 2 and os.getpid() in pids  # this process and one loky worker process shared the work


# -- reproducible, fair studies (issues #10, #15) ---------------------------------------------------------


def _tuned_and_final(results: Path) -> tuple[list[tuple[str, Any]], dict[str, float]]:
    trials = trials_by_study("tiny", results)
    tuned = sorted(
        (t.user_attrs["arm"] + "/" + t.user_attrs["unit"], t.params)
        for name, ts in trials.items()
        if "/tune/" in name
        for t in ts
    )
    final = {t.user_attrs["unit"]: t.user_attrs["metrics"]["test/recall@1"] for t in trials["tiny"]}
    return tuned, final


def test_the_same_study_and_seed_reproduce_every_tuned_value_and_final_metric(tmp_path: Path) -> None:
    """One worker, fresh results folder each time: identical suggestions (seeded per arm and slot) and
    identical final metrics; another study seed suggests other values."""
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        tune={"n_trials": 3, "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
        final={"seeds": [0]},
        seed=7,
    )
    runs = []
    for i, seed in enumerate([7, 7, 8]):
        folder = tmp_path / str(i)
        study.run_study(write(tmp_path, {**spec, "seed": seed}), results=folder, report=False)
        runs.append(_tuned_and_final(folder))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]
    seeds = {
        t.user_attrs["sampler_seed"]
        for n, ts in trials_by_study("tiny", tmp_path / "0").items()
        for t in ts
        if "/tune/" in n
    }
    assert len(seeds) == 6  # every tune trial records its own sampler seed (replayable on its own)


def test_units_are_interleaved_across_arms_so_a_timeout_is_fair() -> None:
    spec = study.parse_study(
        tiny_study(
            arms={"loss.mining": ["batch_hard", "all", "semi_hard"]},
            tune={"n_trials": 2, "params": {"optimizer.lr": [1e-3, 1e-2]}},
        )
    )
    order = [(u.attrs["stage"], u.attrs["arm"].split("=")[1]) for u in spec.units()]
    assert order[:6] == [("tune", m) for m in ("batch_hard", "all", "semi_hard")] * 2
    assert order[6:9] == [("final", m) for m in ("batch_hard", "all", "semi_hard")]


def test_a_study_stopped_by_its_timeout_has_spent_its_trials_evenly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each trial takes 'one unit of time'; the study stops after four: every arm got its share."""
    from harness.study import runner

    real_run, calls = train.run, []

    def counted(config: Any, reporter: Any = None) -> Any:
        calls.append(config)
        if len(calls) >= 4:
            # the deadline has passed (for the runner's clock only)
            clock = SimpleNamespace(
                time=lambda: float("inf"), sleep=time.sleep, perf_counter=time.perf_counter
            )
            monkeypatch.setattr(runner, "time", clock)
        return real_run(config, reporter)

    monkeypatch.setattr(train, "run", counted)
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        tune={"n_trials": 3, "params": {"optimizer.lr": {"low": 1e-3, "high": 3e-3}}},
        final={"seeds": [0]},
        timeout=3600,
    )
    with pytest.raises(study.StudyIncompleteError):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    per_arm = Counter(
        t.user_attrs["arm"]
        for n, ts in trials_by_study("tiny", tmp_path).items()
        for t in ts
        if t.state == TrialState.COMPLETE and "/tune/" in n
    )
    assert per_arm == {"mining=batch_hard": 2, "mining=all": 2}


# -- the literature protocol (issue #9) --------------------------------------------------------------------


def test_literature_protocol_runs_the_papers_recipe_on_every_training_class(tmp_path: Path) -> None:
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        tune={"n_trials": 1, "params": {"optimizer.lr": [1e-3]}},
        final={"seeds": [0, 1]},
        protocol="both",
        literature={"optimizer.lr": 5e-3, "train.epochs": 2},
        published={"mining=all": {"source": "Table 1, row 'batch all'", "recall@1": 55.0}},
        unpublished=["the batch composition"],
    )
    out = study.run_study(write(tmp_path, spec), results=tmp_path)
    trials = trials_by_study("tiny", tmp_path)["tiny"]
    lit = [t for t in trials if t.user_attrs.get("protocol") == "literature"]
    fair = [t for t in trials if t.user_attrs.get("protocol") == "fair"]
    assert len(lit) == 4 and len(fair) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["unit"] for t in lit} == {
        f"mining={m}/literature/seed={s}" for m in ("batch_hard", "all") for s in (0, 1)
    }
    for t in lit:
        cfg = yaml.safe_load((tmp_path / "tiny/runs" / t.user_attrs["run_key"] / "config.yaml").read_text())
        assert cfg["data"]["val_fraction"] == 0.0 and cfg["optimizer"]["lr"] == 5e-3
        assert cfg["train"]["epochs"] == 2 and t.user_attrs["tuned"] == {}
        assert t.value == t.user_attrs["metrics"]["test_last/recall@1"]  # no validation: the last epoch
    df = store.load("tiny", results=tmp_path)
    assert df.attrs["meta"]["published"]["mining=all"]["recall@1"] == 55.0
    assert df.attrs["meta"]["unpublished"] == ["the batch composition"]
    assert out is not None
    table = (out / "tables" / "paper.md").read_text()
    assert "55.0" in table and "Table 1, row 'batch all'" in table
    overview = (out / "report.md").read_text()
    assert "Search: 1 trials per arm over `optimizer.lr`, sampler tpe seeded from study seed 0" in overview
    budget = pd.read_csv(out / "tables" / "trials_per_arm.csv", index_col=0)
    assert (
        budget.loc["mining=all", "literature COMPLETE"] == 2
        and budget.loc["mining=all", "tune COMPLETE"] == 1
    )
    # --protocol literature alone on a fresh name: no tuning at all
    study.run_study(write(tmp_path, spec), results=tmp_path, name="lit", protocol="literature", report=False)
    storage = store.resolve("lit", None, tmp_path)[2]
    assert store.study_names(storage, "lit") == ["lit"]  # no tune stage
    stored = optuna.load_study(study_name="lit", storage=storage).get_trials()
    assert {t.user_attrs["protocol"] for t in stored} == {"literature"} and len(stored) == 4


def test_published_blocks_name_arms_and_metrics() -> None:
    spec = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        protocol="literature",
        published={
            "mining=al": {"recall@1": 50.0},
            "mining=all": {"recal@1": 50.0, "recall@2": "high"},
        },
        literature={"optimizer.lrr": 1},
    )
    with pytest.raises(ConfigError) as err:
        study.parse_study(spec)
    text = "\n".join(err.value.problems)
    assert "published.mining=al: not an arm label" in text
    assert "published.mining=all.recal@1: not a metric" in text
    assert "published.mining=all.recall@2: expected a number in %" in text
    assert "literature: optimizer.lrr" in text


def test_without_a_terminal_each_settled_unit_is_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No tty (tqdm off): one line per finished unit with its arm, value and the study's progress."""
    spec = tiny_study(arms={"loss.mining": ["batch_hard", "all"]}, final={"seeds": [0]})
    with caplog.at_level("INFO", logger="harness.study.runner"):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    lines = [r.getMessage() for r in caplog.records if "units," in r.getMessage()]
    assert len(lines) == 2, lines
    assert any("final mining=all/seed=0 (mining=all): recall@1 " in m for m in lines)
    assert lines[-1].split("; ")[1].startswith("2/2 units")
    assert "left" in lines[-1]


def test_config_errors_only_the_data_shows_are_reported_before_any_trial(tmp_path: Path) -> None:
    """P classes per batch above an arm's training classes: one error naming sampler.p and the arm, before a
    trial runs (it was four failed trials and 'the configs are probably broken'); embedding_dim 0 is
    refused; an invalid base does not also claim that a tune param's `when:` holds for no arm."""
    spec = tiny_study(arms={"sampler.p": [3, 20]})
    with pytest.raises(ConfigError, match=r"arms \(p=20\): sampler.p: 20 classes per batch, but the"):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    assert not (tmp_path / "tiny" / "runs").exists()
    margin = {"low": 0.1, "high": 0.3, "when": {"loss.name": "triplet"}}
    spec = tiny_study(tune={"n_trials": 2, "params": {"loss.margin": margin}})
    spec["base"]["model"]["embedding_dim"] = 0
    with pytest.raises(ConfigError) as err:
        study.parse_study(spec)
    assert err.value.problems == [
        "base.model.embedding_dim: 0 is not a valid int (ge=1) (Input should be greater than or equal to 1)"
    ]


def test_status_and_report_take_the_study_yaml_as_study_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from harness.cli import main

    path = write(tmp_path, tiny_study(final={"seeds": [0]}))
    study.run_study(path, results=tmp_path, report=False)
    capsys.readouterr()
    assert main(["--results", str(tmp_path), "study", "status", str(path)]) == 0
    assert capsys.readouterr().out.startswith("study tiny: 1 trials")
    assert main(["--results", str(tmp_path), "report", str(path)]) == 0
    assert (tmp_path / "tiny" / "report.md").is_file()
