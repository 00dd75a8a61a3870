"""Every ready CPU study (``studies/*.yaml`` but the paper studies) runs end to end at smoke scale.

The study's own data recipe, batch composition (P, K, sampler kind), models and methods are kept, since a
ready study that cannot run them (e.g. more classes per batch than its split trains on) is what a user
meets first; only the schedule is cut to one epoch, the data to a Fashion-MNIST fixture in the official
IDX format, tuning to one trial, seeds to one and each factor to its baseline level and one other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import study
from tests import fixtures

STUDIES = Path(__file__).parents[1] / "studies"
#: The CPU studies on Fashion-MNIST (the paper studies have their own tiny-scale test, quickstart its own;
#: abe_branch_depth_googlenet needs CUB-200-2011 and a GPU).
READY = sorted(
    p.stem
    for p in STUDIES.glob("*.yaml")
    if yaml.safe_load(p.read_text())["base"]["data"]["dataset"]["name"] == "fashion_mnist"
    and p.stem != "quickstart"
)


def _two_levels(levels: list[Any] | dict[str, Any], baseline: Any) -> list[Any] | dict[str, Any]:
    """The factor's baseline level and one other (its first two levels when the baseline is among them)."""
    names = list(levels)
    kept = names[:2] if baseline not in names[1:] else [names[0], baseline]
    return {k: levels[k] for k in kept} if isinstance(levels, dict) else [v for v in levels if v in kept]


def _smoke(name: str, root: Path) -> dict[str, Any]:
    raw = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    base = raw["base"]
    base["data"]["dataset"] = {"name": "fashion_mnist", "root": str(root)}
    base["data"]["num_workers"] = 0
    base["sampler"]["batches_per_epoch"] = 1
    base["train"] = {**base.get("train", {}), "epochs": 1, "device": "cpu", "threads": 1}
    base["eval"] = {**base.get("eval", {}), "ks": [1], "batch_size": 64}
    baseline = raw.get("baseline") or {}
    raw["arms"] = {f: _two_levels(levels, baseline.get(f)) for f, levels in raw["arms"].items()}
    for levels in raw["arms"].values():  # a variant's own schedule is cut too
        for variant in levels.values() if isinstance(levels, dict) else ():
            variant.update({k: 1 for k in variant if k == "sampler.batches_per_epoch"})
    kept = raw["arms"]  # exclusions of levels the smoke test drops go too
    raw["exclude"] = [x for x in raw.get("exclude", []) if all(v in list(kept[f]) for f, v in x.items())]
    if raw.get("tune"):
        raw["tune"]["n_trials"] = 1
    raw["final"] = {"seeds": [0]}
    return raw


def test_every_cpu_study_is_covered() -> None:
    assert {"multigrain", "symmetrical_alpha_beta", "mdr_backbone_x_dim", "pooling_x_whitening_all"} <= set(
        READY
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", READY)
def test_ready_study_runs_every_kept_arm_at_smoke_scale(tmp_path: Path, name: str) -> None:
    root = fixtures.make_fashion_mnist(tmp_path / "fmnist", n_per_class=10)
    raw = _smoke(name, root)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    # raises StudyIncompleteError naming the arms without a completed final run
    out = study.run_study(path, results=tmp_path / "results")
    assert out is not None
    for note in raw.get("notes", []):  # what the arms differ in beyond their factors, beside the table
        assert note in (out / "tables" / "comparison.md").read_text().splitlines()[0]
        assert f"Note: {note}." in (out / "report.md").read_text()
