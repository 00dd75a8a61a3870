"""The paper studies: their resolved settings against the papers' published recipes (written here, so an
edit of a study file cannot drift silently), and tiny end-to-end runs on the datasets' real layouts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import config, study
from harness.study.space import when_holds
from tests import fixtures

STUDIES = Path(__file__).parents[1] / "studies"

#: Gu & Ko, AAAI 2020, official code (METHODS.md §4.4).
SYMM = {
    "optimizer.name": "adam",
    "optimizer.lr": 1e-4,
    "optimizer.weight_decay": 5e-3,
    "sampler.p": 64,
    "sampler.k": 2,
    "sampler.batches_per_epoch": 500,
    "train.epochs": 20,
    "scheduler.name": "step",
    "scheduler.step_size": 10,
    "scheduler.gamma": 0.5,
    "data.transform": "symm_official",
    "data.input_size": 227,
    "backbone.name": "googlenet",
    "model.embedding_dim": 512,
    "model.normalize": "none",
    "train.head_lr_mult": 1.0,  # w_fc=10: no-op under Adam
    "eval.distance": "cosine",
}
#: Kim & Park, AAAI 2021, official code per dataset: (lr, MDR weight, P, K) (METHODS.md §6.4, README).
MDR = {
    "cub200": (5e-5, 0.6, 32, 4),
    "cars196": (5e-5, 0.2, 32, 4),
    "sop": (1e-4, 0.1, 86, 3),
    "inshop": (1e-4, 0.1, 86, 3),
}
MDR_COMMON = {
    "optimizer.name": "adam",
    "optimizer.weight_decay": 1e-5,
    "train.epochs": 100,
    "sampler.batches_per_epoch": 100,
    "scheduler.name": "multistep",
    "scheduler.milestones": [40, 60, 80],
    "scheduler.gamma": 0.2,
    "backbone.name": "bn_inception",
    "backbone.frozen_bn": True,
    "data.transform": "mdr_official",
    "model.embedding_dim": 512,
    "model.normalize": "mean_distance",
    "loss.name": "triplet",
    "loss.margin": 0.2,
    "miner.name": "distance_weighted",
    "regularizers.0.name": "mdr",
    "regularizers.0.levels": [-3.0, 0.0, 3.0],
    "regularizers.0.level_l2": 0.01,
    "regularizers.0.momentum": 0.9,
    "eval.distance": "euclidean",
}
#: Kim et al., ECCV 2018 (issue #9's summary of the paper).
ABE = {
    "optimizer.name": "sgd",
    "optimizer.momentum": 0.9,
    "loss.name": "contrastive",
    "loss.neg_margin": 1.0,
    "model.name": "abe",
    "model.m_div": 1.0,
    "model.init": "xavier",
    "model.embedding_dim": 512,
    "model.branch": "pool3",
    "model.attention_depth": "inception4e",
    "data.transform": "abe_official",
    "backbone.name": "googlenet",
}
DATASETS = ("cub200", "cars196", "sop", "inshop")


def _check(cfg: config.RunConfig, want: dict[str, Any]) -> None:
    resolved = cfg.to_dict()
    wrong = {
        p: (config.lookup(resolved, p, None), v)
        for p, v in want.items()
        if config.lookup(resolved, p, None) != v
    }
    assert not wrong, f"{cfg.name}: (study, paper) differ: {wrong}"


@pytest.mark.parametrize("name", ["paper_cub200", "paper_cars196", "paper_sop"])
def test_symmetrical_synthesis_studies_follow_the_official_recipe(name: str) -> None:
    spec = study.load_study(STUDIES / f"{name}.yaml")
    assert spec.protocol == "both" and set(spec.arm(a.label).values["synthesis"] for a in spec.arms) == {
        None,
        "symmetrical",
    }
    for arm in spec.arms:
        _check(spec.literature_config(arm, 0), SYMM)
    triplet = spec.literature_config(spec.arm("loss=triplet, synthesis=none"), 0)
    _check(triplet, {"loss.name": "triplet", "loss.mining": "all", "loss.margin": 0.2})
    assert spec.literature_config(spec.arms[0], 0).data.dataset.get("bbox_crop", False) == (
        name == "paper_cars196"
    )
    published = spec.meta()["published"]
    assert len(published) == 10 and all("Gu & Ko" in row["source"] for row in published.values())


@pytest.mark.parametrize("dataset", DATASETS)
def test_mdr_studies_follow_the_official_settings_of_each_dataset(dataset: str) -> None:
    spec = study.load_study(STUDIES / f"paper_mdr_{dataset}.yaml")
    lr, weight, p, k = MDR[dataset]
    mdr = spec.literature_config(spec.arm("head=mdr"), 0)
    _check(
        mdr,
        {**MDR_COMMON, "optimizer.lr": lr, "regularizers.0.weight": weight, "sampler.p": p, "sampler.k": k},
    )
    assert mdr.train.best_test_every == 1  # the official code evaluates every epoch; reported labelled
    assert spec.config(spec.arm("head=mdr"), {}).train.best_test_every is None  # never in the fair protocol
    l2 = spec.literature_config(spec.arm("head=l2"), 0)
    assert l2.model["normalize"] == "l2" and l2.regularizers == []
    assert spec.meta()["unpublished"], "say what is not from the paper"


@pytest.mark.parametrize("dataset", DATASETS)
def test_abe_studies_follow_the_paper(dataset: str) -> None:
    spec = study.load_study(STUDIES / f"paper_abe_{dataset}.yaml")
    for arm in spec.arms:
        cfg = spec.literature_config(arm, 0)
        _check(cfg, ABE)
        assert (cfg.sampler.kind, cfg.sampler.positive_pairs, cfg.sampler.negative_pairs) == ("pairs", 16, 16)
    variants = {spec.literature_config(a, 0).model["variant"] for a in spec.arms}
    assert variants == {"attention", "heads"}
    assert {a.values["model.m"] for a in spec.arms} == {1, 2, 4, 8}
    (row,) = spec.meta()["published"].values()
    assert row["recall@1"] == {"cub200": 60.6, "cars196": 85.2, "sop": 76.3, "inshop": 87.3}[dataset]


# -- tiny end-to-end runs on each dataset's real layout, both protocols -----------------------------------

TINY = {
    "sampler": {"p": 2, "k": 2, "positive_pairs": 2, "negative_pairs": 2, "batches_per_epoch": 2},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
    "train": {"epochs": 1, "eval_every": 1, "device": "cpu", "amp": False, "threads": 1},
}
#: ABE's GoogLeNet split (pool3 / inception4e) on the small convnet's stages: S through block2 (8×8 at 16 px),
#: the attention trunk through block3; 2 dimensions for each of 8 learners.
TINY_ABE = {"branch": "block2", "attention_depth": "block3", "embedding_dim": 16}


def _tiny_protocol(folder: Path, root: Path) -> None:
    """``studies/protocols/fair.yaml`` at tiny scale (the same entries with tiny values; one tune trial, one
    seed; CPU) as ``folder/protocols/fair.yaml``, where a shrunk study written to ``folder`` finds it."""
    protocol = yaml.safe_load((STUDIES / "protocols" / "fair.yaml").read_text())
    tiny = {
        "backbone": TINY["backbone"],
        "data.input_size": 16,
        "data.resize_size": 18,
        "data.val_fraction": 0.3,
        "sampler": {"kind": "pk", "p": 2, "k": 2, "repeated_augmentations": 1},
        "sampler.batches_per_epoch": 2,
        "model.embedding_dim": 16,  # 2 dimensions for each of ABE's 8 learners
        "train.amp": False,
        "eval.batch_size": 16,
    }
    for entry in protocol["settings"]:
        entry["value"] = tiny.get(entry["key"], entry["value"])
    run = {"train.device": "cpu", "train.threads": 1, "data.num_workers": 0}
    protocol["settings"] += [{"key": k, "value": v, "source": "ours", "why": "tiny"} for k, v in run.items()]
    for entries in protocol["datasets"].values():
        for entry in entries:
            if entry["key"] == "data.dataset":
                entry["value"] = {**entry["value"], "root": str(root)}
            entry["value"] = {"train.epochs": 1, "train.eval_every": 1, "eval.ks": [1, 2]}.get(
                entry["key"], entry["value"]
            )
    protocol["tune"]["n_trials"] = 1
    protocol["final"]["seeds"] = [0]
    (folder / "protocols").mkdir(parents=True, exist_ok=True)
    (folder / "protocols" / "fair.yaml").write_text(yaml.safe_dump(protocol, sort_keys=False))


def _shrink(name: str, root: Path, keep: dict[str, list[Any]], protocol: str) -> dict[str, Any]:
    """The study file with tiny models and schedules (its fair arms on ``_tiny_protocol``), and of each
    factor in ``keep`` only the levels (values or variant names) given; a baseline level dropped becomes the
    first kept one. The published rows and labels of the kept arms stay."""
    raw = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    base = raw["base"]
    base["data"] = {
        **base["data"],
        "input_size": 16,
        "resize_size": 18,
        "num_workers": 0,
        "val_fraction": 0.3,
    }
    base["data"]["dataset"] = {**base["data"]["dataset"], "root": str(root)}
    for section, values in TINY.items():
        base[section] = {**(base.get(section, {}) if section != "backbone" else {}), **copy.deepcopy(values)}
    base["model"] = {**base["model"], "embedding_dim": 8}
    if base["model"]["name"] == "abe":
        base["model"].update(TINY_ABE)
        raw["fair"]["method"]["model"].update({k: TINY_ABE[k] for k in ("branch", "attention_depth")})
    base["eval"] = {**base["eval"], "ks": [1, 2], "batch_size": 16}
    for factor, kept in keep.items():
        levels = raw["arms"][factor]
        assert all(k in levels for k in kept), f"{name}: arms.{factor} has no level among {kept}"
        raw["arms"][factor] = {k: levels[k] for k in kept} if isinstance(levels, dict) else kept
    if raw.get("baseline"):
        arms = raw["arms"]
        raw["baseline"] = {f: v if v in arms[f] else next(iter(arms[f])) for f, v in raw["baseline"].items()}
    raw["recipe"] = None  # a tiny run is not the paper's recipe (tests/test_recipe.py checks the real one)
    raw["protocol"] = protocol
    raw["literature"] = {**raw.get("literature", {}), "sampler.p": 2}
    probe = dict(raw, published={}, labels={}, fair={k: v for k, v in raw["fair"].items() if k != "tune"})
    arms = study.parse_study(probe, protocol="literature", folder=STUDIES).arms
    labels = {a.label for a in arms}
    fair = [config.validate(a.fair_raw).to_dict() for a in arms]  # tune only what a kept arm has
    params = raw["fair"]["tune"]["params"]
    raw["fair"]["tune"]["params"] = {
        k: v for k, v in params.items() if any(when_holds(v.get("when", {}), c) for c in fair)
    }
    raw["published"] = {k: v for k, v in raw["published"].items() if k in labels}
    raw["labels"] = {k: v for k, v in raw.get("labels", {}).items() if k in labels}
    return raw


#: Fixtures on each dataset's real layout: a few training classes (enough for validation classes under the
#: fair protocol) and 2-3 test classes.
DATA = {
    "cub200": lambda r: fixtures.make_cub200(r, classes=(*range(1, 7), 101, 102, 103), per_class=3),
    "cars196": lambda r: fixtures.make_cars196(r, classes=(*range(1, 7), 99, 100, 101), per_class=3),
    "sop": lambda r: fixtures.make_sop(r, train_classes=6, test_classes=3, per_class=3),
    "inshop": lambda r: fixtures.make_inshop(r, train_items=6),
}
#: Every paper study with the arms it keeps: a published one where the study has published numbers.
PAPER_STUDIES = {
    **{f"symm-{d}": (f"paper_{d}", d, {"loss": ["triplet"]}) for d in ("cub200", "cars196", "sop")},
    **{f"mdr-{d}": (f"paper_mdr_{d}", d, {"head": ["l2", "mdr"]}) for d in DATASETS},
    **{
        f"abe-{d}": (
            f"paper_abe_{d}",
            d,
            {"ensemble": ["abe", "heads"], "model.m": [8], "model.lambda_div": [1.0]},
        )
        for d in DATASETS
    },
}


def test_every_paper_study_runs_at_tiny_scale() -> None:
    assert {name for name, _, _ in PAPER_STUDIES.values()} == {p.stem for p in STUDIES.glob("paper_*.yaml")}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dataset", "keep"), list(PAPER_STUDIES.values()), ids=list(PAPER_STUDIES))
def test_paper_studies_run_end_to_end_and_report_the_paper_table(
    tmp_path: Path, name: str, dataset: str, keep: dict[str, list[Any]]
) -> None:
    root = tmp_path / "data"
    DATA[dataset](root)
    raw = _shrink(name, root, keep, "both")
    _tiny_protocol(tmp_path, root)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the factors' order makes the arm labels
    out = study.run_study(path, results=tmp_path / "results")
    assert out is not None
    table = (out / "tables" / "paper.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("|"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    sides = ["published (%)", "ours, literature (%)", "ours, fair (%)"]
    assert [c for c in columns if c in sides] == sides
    if raw.get("literature", {}).get("train.best_test_every"):
        assert "ours, literature, best test epoch (%)" in columns
    for row in raw["published"].values():
        assert f"{row['recall@1']:.1f}" in table
    if raw["base"]["model"]["name"] == "abe":  # the attention arm's masks, none for the M-heads arm
        assert [p.name for p in (out / "plots").glob("abe_attention_masks_*.png")] == [
            "abe_attention_masks_ensemble_abe_m_8_lambda_div_1.png"
        ]
