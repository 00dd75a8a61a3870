"""One fair protocol for every paper study (issue #25 part 3): ``studies/protocols/fair.yaml`` gives every
paper study's fair arms the same config but for the method under study; the include and its errors; the
refit of the final runs on every training class; and the study file's "did you mean" (issue #27).
Spec resolution only, but for one tiny study run (the refit)."""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from harness import config, learner, study
from harness.errors import ConfigError
from harness.reporting import paper
from harness.study.protocol import METHOD_KEYS, protocol_fixes
from harness.study.recipe import leaves
from harness.study.space import representative
from tests.test_study import tiny_study, trials_by_study, write

STUDIES = Path(__file__).parents[1] / "studies"
PROTOCOL = STUDIES / "protocols" / "fair.yaml"
PAPER = sorted(p.stem for p in STUDIES.glob("paper_*.yaml"))
#: What the protocol sets per dataset; everything else is the same on every dataset.
PER_DATASET = ("data.dataset", "train.epochs", "train.eval_every", "eval.ks")


@pytest.fixture(scope="module")
def specs() -> Iterator[dict[str, study.StudySpec]]:
    """Every paper study, resolved once. Building every arm's model (``check_assembly``) is left to
    ``dmlh study check`` (tests/test_recipe.py): these tests read configs only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(learner, "check_assembly", lambda cfg: [])
        yield {name: study.load_study(STUDIES / f"{name}.yaml") for name in PAPER}


def _raw(name: str) -> dict[str, Any]:
    return config.load_yaml(STUDIES / f"{name}.yaml")


def _problems(raw: dict[str, Any], folder: Path = STUDIES) -> list[str]:
    with pytest.raises(ConfigError) as e:
        study.parse_study(raw, folder=folder)
    return e.value.problems


def _protocol_part(cfg: config.RunConfig) -> dict[str, Any]:
    """The leaves of a resolved config that the protocol decides (all but the method under study)."""
    return {p: v for p, v in leaves(cfg.to_dict(), "") if p != "name" and protocol_fixes(p)}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


# -- one protocol for every paper study -------------------------------------------------------------------


def test_every_paper_study_resolves_its_fair_arms_to_one_config_but_the_method(
    specs: dict[str, study.StudySpec],
) -> None:
    """Per dataset, every arm of every paper study (tune and final runs, with its tuned values) has the same
    config outside the method (model head, loss, miner, synthesis, regularizers); across datasets only the
    dataset, its budget and its Recall@K differ. Budget, seeds and objective are the same everywhere."""
    by_dataset: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    budgets = set()
    for name, spec in specs.items():
        assert spec.fair is not None and spec.fair.path.resolve() == PROTOCOL.resolve(), name
        budgets.add((spec.n_trials, tuple(spec.seeds), spec.sampler, spec.pruner, spec.metric, spec.refit))
        for arm in spec.arms:
            tuned = {p.path: representative(p.distribution) for p in spec.params}
            tuned = spec.suggest(optuna.trial.FixedTrial(tuned), arm)
            tune, final = spec.config(arm, tuned), spec.final_config(arm, tuned, seed=3)
            assert final.data.val_fraction == 0.0 and final.seed == 3  # retrained on every training class
            assert _protocol_part(final) == {**_protocol_part(tune), "data.val_fraction": 0.0, "seed": 3}
            by_dataset[spec.fair.dataset][f"{name} ({arm.label})"] = _protocol_part(tune)
    assert budgets == {(20, (0, 1, 2, 3, 4), "tpe", None, "map@r", True)}
    assert set(by_dataset) == {"cub200", "cars196", "sop", "inshop"}
    assert {d: len({k.split(" ")[0] for k in arms}) for d, arms in by_dataset.items()} == {
        "cub200": 3, "cars196": 3, "sop": 3, "inshop": 2,
    }  # fmt: skip
    reference: dict[str, Any] | None = None
    for dataset, arms in by_dataset.items():
        (first, want), *rest = arms.items()
        for arm, got in rest:
            assert got == want, f"{dataset}: {arm} differs from {first}: {_differences(want, got)}"
        common = {k: v for k, v in want.items() if not k.startswith(PER_DATASET)}
        reference = reference or common
        assert common == reference, f"{dataset}: {_differences(reference, common)}"
    assert reference["backbone.name"] == "bn_inception" and reference["model.embedding_dim"] == 512
    assert (reference["sampler.p"], reference["sampler.k"], reference["optimizer.name"]) == (8, 4, "rmsprop")


def test_the_literature_arms_keep_the_papers_recipes(specs: dict[str, study.StudySpec]) -> None:
    """The fair protocol does not reach the literature column: each paper keeps its own backbone, batch."""
    lit = {
        name: {
            (c.backbone["name"], c.sampler.kind) for c in (spec.literature_config(a, 0) for a in spec.arms)
        }
        for name, spec in specs.items()
        if name.endswith("cub200")
    }
    assert lit == {
        "paper_cub200": {("googlenet", "pk")},
        "paper_mdr_cub200": {("bn_inception", "pk")},
        "paper_abe_cub200": {("googlenet", "pairs")},
    }


def test_each_method_tunes_its_own_hyperparameters_with_the_same_budget(
    specs: dict[str, study.StudySpec],
) -> None:
    """Only method keys are tuned; a parameter applies to the arms that have it (MDR's weight to the MDR
    arm, a missing path such as regularizers.0 of an arm without one does not hold)."""
    assert all(not protocol_fixes(p.path) for spec in specs.values() for p in spec.params)
    spec = specs["paper_mdr_cub200"]
    values = {p.path: representative(p.distribution) for p in spec.params}
    tuned = {a.label: set(spec.suggest(optuna.trial.FixedTrial(values), a)) for a in spec.arms}
    margin = {"loss.margin"}
    assert tuned == {"head=l2": margin, "head=no_l2": margin, "head=mdr": margin | {"regularizers.0.weight"}}
    abe = specs["paper_abe_cub200"]
    values = {p.path: representative(p.distribution) for p in abe.params}
    m1 = abe.arm("ensemble=abe, m=1, lambda_div=1")
    assert set(abe.suggest(optuna.trial.FixedTrial(values), m1)) == {
        "loss.neg_margin"
    }  # no divergence at M=1


# -- the include and its errors ---------------------------------------------------------------------------


def test_the_protocol_path_is_relative_to_the_study_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "protocols").mkdir()
    (tmp_path / "protocols" / "fair.yaml").write_text(PROTOCOL.read_text())
    (tmp_path / "paper_mdr_cub200.yaml").write_text((STUDIES / "paper_mdr_cub200.yaml").read_text())
    spec = study.load_study(tmp_path / "paper_mdr_cub200.yaml")
    assert spec.fair.path == tmp_path / "protocols" / "fair.yaml"
    assert spec.meta()["fair_protocol"]["name"] == "fair" and spec.meta()["refit"] is True
    caption = paper.paper_caption(spec.name, spec.meta())  # the paper table says which protocol
    assert "Fair protocol: one protocol for every method (fair.yaml: Musgrave" in caption
    monkeypatch.chdir(tmp_path)  # a study dict without a file: relative to the working directory
    assert study.parse_study(_raw("paper_mdr_cub200")).fair.dataset == "cub200"


def test_the_include_says_what_is_wrong_with_its_yaml_path() -> None:
    raw = _raw("paper_mdr_cub200")
    missing = copy.deepcopy(raw)
    missing["fair"]["protocol"] = "protocols/nowhere.yaml"
    (problem,) = _problems(missing)
    assert problem.startswith(f"fair.protocol: {STUDIES / 'protocols' / 'nowhere.yaml'} not found")

    typos = copy.deepcopy(raw)
    typos["fair"]["protocl"] = typos["fair"].pop("protocol")
    typos["fair"]["method"]["los"] = typos["fair"]["method"].pop("loss")
    typos["fair"]["tune"]["parms"] = typos["fair"]["tune"].pop("params")
    problems = _problems(typos)
    for expected in (
        "fair.protocl: unknown key; did you mean 'protocol'?",
        "fair.method.los: unknown key; did you mean 'loss'?",
        "fair.tune.parms: unknown key; did you mean 'params'?",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert not any("Field required" in p for p in problems)  # the typo says it, once

    unknown = copy.deepcopy(raw)
    unknown["fair"]["dataset"] = "cub"
    assert _problems(unknown) == [
        "fair.dataset: 'cub' is not a dataset of fair.yaml; did you mean 'cub200'? (has: cub200, cars196, "
        "sop, inshop)"
    ]


def test_a_study_cannot_change_what_the_protocol_fixes() -> None:
    raw = _raw("paper_mdr_cub200")
    wrong = copy.deepcopy(raw)
    wrong["fair"]["method"]["optimizer"] = {"name": "sgd"}
    assert _problems(wrong) == [  # and no problem of the fair arms that the broken fair: cannot give
        "fair.method.optimizer: unknown key; did you mean 'miner'? (valid: model, loss, miner, synthesis, "
        "regularizers)"
    ]
    raw["fair"]["method"]["model"]["embedding_dim"] = 128
    raw["fair"]["tune"]["params"]["optimizer.lr"] = {"low": 1e-5, "high": 1e-3, "log": True}
    raw["tune"] = {"n_trials": 3, "params": {"loss.margin": [0.1, 0.2]}}
    raw["final"] = {"seeds": [0]}
    problems = _problems(raw)
    for expected in (
        "fair.method.model.embedding_dim: the protocol fixes it",
        "fair.tune.params.optimizer.lr: the protocol fixes it",
        "tune: a study with fair: takes it from its protocol (protocols/fair.yaml); the method's own "
        "hyperparameters go under fair.tune.params",
        "final: a study with fair: takes it from its protocol (protocols/fair.yaml), for both protocols",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def _protocol_problems(tmp_path: Path, edit: Any) -> list[str]:
    protocol = yaml.safe_load(PROTOCOL.read_text())
    edit(protocol)
    (tmp_path / "protocols").mkdir(exist_ok=True)
    (tmp_path / "protocols" / "fair.yaml").write_text(yaml.safe_dump(protocol))
    return _problems(_raw("paper_mdr_cub200"), folder=tmp_path)


def test_a_protocol_file_states_every_setting_outside_the_method(tmp_path: Path) -> None:
    where = f"fair.protocol: {tmp_path / 'protocols' / 'fair.yaml'}"

    def drop_scheduler(p: dict[str, Any]) -> None:
        p["settings"] = [e for e in p["settings"] if e["key"] != "scheduler"]

    assert _protocol_problems(tmp_path, drop_scheduler) == [
        f"{where}: scheduler (= None for cub200) decides the number and the protocol does not state it; add "
        "{key: scheduler, value: …, source: paper …|code …|ours, why: …}"
    ]

    def typo(p: dict[str, Any]) -> None:
        p["not_suported"] = p.pop("not_supported")

    assert _protocol_problems(tmp_path, typo) == [
        f"{where}: not_suported: unknown key; did you mean 'not_supported'? (valid: name, source, settings, "
        "method_defaults, datasets, tune, objective, final, not_supported)"
    ]

    def no_why(p: dict[str, Any]) -> None:
        p["datasets"]["cub200"].append({"key": "eval.ks", "value": [1], "source": "paper"})

    assert _protocol_problems(tmp_path, no_why) == [f"{where}: datasets.cub200.4.why: Field required"]

    def method_key_no_source_and_twice(p: dict[str, Any]) -> None:
        p["settings"].append({"key": "loss.margin", "value": 0.1, "source": "ours", "why": "x"})
        p["settings"].append({"key": "eval.backend", "value": "torch", "source": "a blog", "why": "x"})
        p["datasets"]["sop"].append({"key": "scheduler", "value": None, "source": "ours", "why": "x"})

    assert _protocol_problems(tmp_path, method_key_no_source_and_twice) == [
        f"{where}: settings (eval.backend).source: 'a blog' must be 'ours' or start with 'paper' or 'code'",
        f"{where}: settings (loss.margin): part of the method under study (model, loss, miner, synthesis, "
        "regularizers); a protocol default for it goes under method_defaults",
        f"{where}: datasets.sop: scheduler is also in settings",
    ]


def test_the_readme_fair_snippet_is_a_valid_fair_block() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("fair:")]
    raw = _raw("paper_mdr_cub200")
    raw["fair"] = config.parse_yaml(block)["fair"]
    spec = study.parse_study({**raw, "protocol": "fair", "recipe": None}, folder=STUDIES)
    assert spec.fair is not None and [p.path for p in spec.params] == ["loss.margin"]


def test_the_protocol_file_gives_every_choice_a_reason() -> None:
    raw = config.load_yaml(PROTOCOL)
    entries = raw["settings"] + raw["method_defaults"] + [e for es in raw["datasets"].values() for e in es]
    assert all(str(e["why"]).strip() and e["source"] for e in entries)
    assert all(str(raw[k]["why"]).strip() for k in ("tune", "objective", "final"))
    assert any("k-fold" in line for line in raw["not_supported"])
    assert set(METHOD_KEYS) == {"model", "loss", "miner", "synthesis", "regularizers"}


# -- the refit: the chosen values retrained on every training class ----------------------------------------


def test_a_refit_final_trains_on_every_training_class_and_reports_the_last_epoch(tmp_path: Path) -> None:
    raw = tiny_study(
        "refit",
        tune={"n_trials": 1, "params": {"loss.margin": [0.3]}},
        final={"seeds": [0], "refit": True},
    )
    out = study.run_study(write(tmp_path, raw), results=tmp_path / "results")
    assert out is not None
    trials = trials_by_study("refit", tmp_path / "results")
    (final,) = [t for t in trials["refit"] if t.state == TrialState.COMPLETE]
    (tune,) = [t for ts in trials.values() for t in ts if t.user_attrs.get("stage") == "tune"]
    assert "val/recall@1" in tune.user_attrs["metrics"]
    assert "val/recall@1" not in final.user_attrs["metrics"]  # no validation classes: all of them train
    assert final.value == pytest.approx(final.user_attrs["metrics"]["test_last/recall@1"])
    assert final.user_attrs["tuned"] == {"loss.margin": 0.3}
    (run,) = (tmp_path / "results").rglob(f"runs/{final.user_attrs['run_key']}/config.yaml")
    assert yaml.safe_load(run.read_text())["data"]["val_fraction"] == 0.0


# -- "did you mean" for the study file's own keys (issue #27) ------------------------------------------------


def test_study_keys_get_the_same_suggestions_as_the_run_config() -> None:
    def problems(**sections: Any) -> list[str]:
        with pytest.raises(ConfigError) as e:
            study.parse_study(tiny_study(**sections))
        return e.value.problems

    assert problems(tune={"n_trails": 4, "params": {"optimizer.lr": [0.1]}}) == [
        "tune.n_trails: unknown key; did you mean 'n_trials'? (valid: n_trials, params, sampler, pruner)"
    ]
    assert problems(tune={"n_trials": 4, "sampelr": "tpe", "params": {"optimizer.lr": [0.1]}}) == [
        "tune.sampelr: unknown key; did you mean 'sampler'? (valid: n_trials, params, sampler, pruner)"
    ]
    assert problems(tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 0.01, "hihg": 0.1}}}) == [
        "tune.params.optimizer.lr.hihg: unknown key; did you mean 'high'? (valid: low, high, log, step, "
        "choices, when)"
    ]
    assert problems(tune={"params": {"optimizer.lr": [0.1]}}) == ["tune.n_trials: Field required"]
    (exclude,) = problems(exlude=[])
    assert exclude.startswith("exlude: unknown key; did you mean 'exclude'?")
    (final,) = problems(final={"seed": [1]})
    assert final.startswith("final.seed: unknown key; did you mean 'seeds'?")
