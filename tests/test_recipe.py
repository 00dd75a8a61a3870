"""The paper studies' recipes as data (issue #25): every paper study states every decisive setting of its
literature protocol with a source, ``dmlh study check`` verifies it against the resolved config of every arm,
and the fixes the audit asked for are in force (full precision, decay rule, angular weight, MDR's every-epoch
test evaluation)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from harness import cli, config, registry, study
from harness.errors import ConfigError
from harness.learner import Learner
from harness.optim import decay_groups
from harness.reporting import paper
from harness.study.recipe import DECISIVE, decisive, recipe_rows
from tests.test_report_paper import R1, meta, write_store

STUDIES = Path(__file__).parents[1] / "studies"
PAPER = sorted(p.stem for p in STUDIES.glob("paper_*.yaml"))


def _raw(name: str) -> dict[str, Any]:
    return config.load_yaml(STUDIES / f"{name}.yaml")


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        study.parse_study(raw, folder=STUDIES)  # the fair: protocol path is relative to the studies
    return e.value.problems


@pytest.mark.parametrize("name", PAPER)
def test_every_paper_study_states_its_recipe_and_it_checks(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(name)
    assert raw.get("recipe"), f"{name}: no recipe: block"
    kinds = {r["kind"] for r in recipe_rows({"recipe": raw["recipe"]})}
    assert "ours" in kinds and kinds & {"paper", "code"}
    assert cli.main(["study", "check", str(STUDIES / f"{name}.yaml")]) == 0
    assert "matches the literature config of every arm" in capsys.readouterr().out


def test_a_wrong_recipe_value_fails_with_its_yaml_path_and_both_values() -> None:
    raw = _raw("paper_cub200")
    i = next(i for i, e in enumerate(raw["recipe"]) if e["key"] == "optimizer")
    raw["recipe"][i]["value"]["lr"] = 0.001
    problems = _problems(raw)
    assert problems == [
        f"recipe[{i}] (optimizer.lr): the recipe says 0.001, the literature config of every arm has 0.0001"
    ]


def test_a_config_that_drifts_from_its_recipe_fails_per_arm() -> None:
    raw = _raw("paper_cub200")
    raw["arms"]["loss"]["angular"]["loss"]["weight"] = 1.0  # the audit's item 4, undone
    problems = _problems(raw)
    assert len(problems) == 2  # the entry of each angular arm (code without synthesis, ours with it)
    arms = ["loss=angular, synthesis=none", "loss=angular, synthesis=symmetrical"]
    for problem, arm in zip(problems, arms, strict=True):
        assert problem.startswith("recipe[") and "(loss.weight): the recipe says 2, " in problem
        assert problem.endswith(f"the literature config of arm '{arm}' has 1")


def test_a_decisive_setting_without_an_entry_fails() -> None:
    raw = _raw("paper_mdr_cub200")
    raw["recipe"] = [e for e in raw["recipe"] if e["key"] != "train.amp"]
    problems = _problems(raw)
    assert problems == [
        "recipe: train.amp (= false in every arm) decides the number and is neither in the recipe nor marked "
        "ours; add {key: train.amp, value: …, source: paper …|code …|ours, why: …}"
    ]


def test_sources_are_paper_code_or_ours_with_a_reason() -> None:
    raw = _raw("paper_abe_cub200")
    raw["recipe"] += [
        {"key": "eval.distance", "value": "euclidean", "source": "ours"},
        {"key": "eval.distance", "value": "euclidean", "source": "a blog post"},
        {"key": "eval.distance", "value": "euclidean", "source": "paper", "when": {"loss": "x"}},
        {"key": "eval.nowhere", "value": 1, "source": "paper"},
    ]
    n = len(raw["recipe"])
    problems = _problems(raw)
    assert f"recipe[{n - 4}] (eval.distance).why: a setting of ours says why in one line" in problems
    assert any(p.startswith(f"recipe[{n - 3}] (eval.distance).source: 'a blog post'") for p in problems)
    assert any(
        p.startswith(f"recipe[{n - 2}] (eval.distance).when.loss: not an arm factor") for p in problems
    )
    assert any(p.startswith(f"recipe[{n - 1}] (eval.nowhere): not a setting") for p in problems)


def test_the_decisive_list_covers_what_decides_a_number() -> None:
    cfg = config.validate({"optimizer": {"name": "sgd"}, "train": {"amp": True}}).to_dict()
    keys = set(decisive(cfg))
    for path in (
        "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "optimizer.decay", "scheduler",
        "sampler.p", "sampler.k", "sampler.kind", "train.epochs", "data.transform", "data.input_size",
        "model.embedding_dim", "model.normalize", "backbone.name", "backbone.frozen_bn", "loss.name",
        "loss.margin", "miner", "synthesis", "regularizers", "train.amp", "train.amp_dtype",
        "train.eval_every", "train.best_test_every", "eval.distance",
    ):  # fmt: skip
        assert path in keys, path
    assert "sampler.positive_pairs" not in keys and "data.num_workers" not in keys and "seed" not in keys
    assert "data.dataset.root" not in keys and "eval.batch_size" not in keys
    assert "optimizer" in DECISIVE


def test_a_trial_run_may_drop_the_recipe() -> None:
    spec = study.load_study(STUDIES / "paper_cub200.yaml", ["base.train.epochs=1", "recipe=null"])
    assert spec.literature_config(spec.arms[0], 0).train.epochs == 1


# -- the audit's fixes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAPER)
def test_the_literature_protocol_trains_in_full_precision(name: str) -> None:
    spec = study.load_study(STUDIES / f"{name}.yaml")
    assert spec.config(spec.arms[0], {}).train.amp  # the fair protocol's speed setting stays
    assert all(not spec.literature_config(a, 0).train.amp for a in spec.arms)


def test_a_study_may_train_its_literature_protocol_with_autocast() -> None:
    raw = _raw("paper_mdr_cub200")
    raw["literature"] = {**raw["literature"], "train.amp": True}
    raw["recipe"] = None
    spec = study.parse_study(raw, folder=STUDIES)
    assert spec.literature_config(spec.arms[0], 0).train.amp


def test_mdr_evaluates_the_test_split_every_epoch_in_the_literature_protocol() -> None:
    for ds in ("cub200", "cars196", "sop", "inshop"):
        spec = study.load_study(STUDIES / f"paper_mdr_{ds}.yaml")
        assert {spec.literature_config(a, 0).train.best_test_every for a in spec.arms} == {1}


@pytest.mark.parametrize("name", ["paper_cub200", "paper_cars196", "paper_sop"])
def test_symmetrical_synthesis_studies_use_the_official_decay_rule_and_angular_weight(name: str) -> None:
    spec = study.load_study(STUDIES / f"{name}.yaml")
    for arm in spec.arms:
        cfg = spec.literature_config(arm, 0)
        assert cfg.optimizer["decay"] == "no_bn"
        if cfg.loss["name"] == "angular":
            assert cfg.loss["weight"] == 2.0
        if cfg.loss["name"] == "lifted_structured":
            assert cfg.loss["synthesis_rule"] == "per_negative"
        if cfg.loss.get("mining") == "semi_hard":
            assert cfg.loss["distance"] == "sqeuclidean"  # TF's semi-hard triplet


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("decay", "free"), [("all", set()), ("no_bn", {"bn.weight", "bn.bias"}), ("no_bn_no_bias", None)]
)
def test_decay_rules_exempt_normalisation_layers_and_biases(decay: str, free: set[str] | None) -> None:
    net = _Net()
    names = {id(p): n for n, p in net.named_parameters()}
    groups = [{"params": list(net.parameters()), "lr": 0.1, "weight_decay": 0.01, "name": "head"}]
    out = decay_groups(groups, [net], decay)
    undecayed = {names[id(p)] for g in out if g["weight_decay"] == 0.0 for p in g["params"]}
    want = {"bn.weight", "bn.bias", "conv.bias", "fc.bias"} if free is None else free
    assert undecayed == want
    assert sum(len(g["params"]) for g in out) == len(names)
    assert all(g["lr"] == 0.1 for g in out)


def test_the_optimizer_of_a_run_leaves_batchnorm_undecayed_with_decay_no_bn() -> None:
    cfg = config.validate(
        {
            "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
            "optimizer": {"name": "adam", "weight_decay": 0.005, "decay": "no_bn"},
            "train": {"device": "cpu", "amp": False},
        }
    )
    learner = Learner.build(cfg, num_classes=4, in_channels=3, device=torch.device("cpu"))
    bn = {id(p) for m in learner.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn, "the test network has BatchNorm layers"
    for g in learner.optimizer.param_groups:
        ids = {id(p) for p in g["params"]}
        assert not (ids & bn) or g["weight_decay"] == 0.0
        assert not (ids - bn) or g["weight_decay"] == 0.005


def test_rmsprop_steps_as_its_formula_with_the_reality_checks_defaults() -> None:
    """The fair protocol's optimizer (Musgrave et al.: RMSprop, lr 1e-6, momentum 0.9, weight decay 1e-4)
    against its update written out: g += wd·w; v = α·v + (1 − α)·g²; b = μ·b + g / (√v + ε); w -= lr·b."""
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = registry.build("optimizer", "rmsprop", context={"params": [{"params": [w]}]})
    assert isinstance(opt, torch.optim.RMSprop)
    lr, wd, mu, alpha, eps = 1e-6, 1e-4, 0.9, 0.99, 1e-8
    naive, v, b = w.detach().clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for step in range(3):
        target = torch.arange(5, dtype=torch.float64) * (step + 1)
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        g = 2 * (naive - target) + wd * naive
        v = alpha * v + (1 - alpha) * g**2
        b = mu * b + g / (v.sqrt() + eps)
        naive = naive - lr * b
        assert torch.allclose(w.detach(), naive, rtol=0, atol=1e-15)


def test_angular_weight_scales_the_loss() -> None:
    torch.manual_seed(0)
    x, labels = torch.randn(8, 5, dtype=torch.float64), torch.arange(4).repeat_interleave(2)
    one = registry.build("loss", "angular", context={"synthesis": None})
    two = registry.build("loss", "angular", context={"synthesis": None}, weight=2.0)
    assert two(x, labels).value.item() == pytest.approx(2 * one(x, labels).value.item(), rel=1e-12)


# -- the report ----------------------------------------------------------------------------------------


def test_the_report_prints_the_recipe_under_the_paper_table(tmp_path: Path) -> None:
    from harness import report

    recipe = copy.deepcopy(_raw("paper_cub200")["recipe"])
    write_store(tmp_path, "paper", meta(published={}, recipe=recipe), R1)
    folder = report.write_report("paper", results=tmp_path)
    overview = (folder / "report.md").read_text()
    assert (
        overview.index("## Published vs ours")
        < overview.index("### Recipe")
        < overview.index("## Comparison")
    )
    table = pd.read_csv(folder / "tables/recipe.csv")
    assert list(table["from"].drop_duplicates()) == ["from the paper", "from the official code", "ours"]
    lr = table[table.setting == "optimizer"].iloc[0]
    assert "lr=0.0001" in lr.value and lr["source / why"].startswith("code train.py")
    ours = table[table["from"] == "ours"]
    assert (ours["source / why"].str.len() > 0).all()
    assert "loss.weight (loss=angular, synthesis=symmetrical)" in set(table.setting)
    assert (folder / "tables/recipe.tex").is_file() and "\\toprule" in (
        folder / "tables/recipe.tex"
    ).read_text()


def test_recipe_table_of_a_study_without_one_is_empty() -> None:
    assert paper.recipe_table({}).empty


def test_study_meta_carries_the_recipe() -> None:
    spec = study.load_study(STUDIES / "paper_abe_cub200.yaml")
    assert spec.meta()["recipe"] == yaml.safe_load(yaml.safe_dump(_raw("paper_abe_cub200")["recipe"]))
