"""The paper table of a paper study: published, ours (literature), ours (fair) and the differences, from a
hand-written store (an Optuna journal with final trials of both protocols)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.stats

from harness import report, store

ARMS = ["loss=triplet, synthesis=none", "loss=triplet, synthesis=symmetrical"]
PUBLISHED = {
    ARMS[0]: {"source": "Table 1, row 'Triplet'", "recall@1": 40.0, "recall@2": 52.5, "nmi": 60.0},
    ARMS[1]: {"source": "Table 1, row 'Triplet + Symm'", "recall@1": 55.0, "recall@2": 67.3, "nmi": 62.0},
}
#: (arm, protocol) -> recall@1 of seeds 0, 1, 2
R1 = {
    (ARMS[0], "literature"): [0.41, 0.43, 0.42],
    (ARMS[0], "fair"): [0.40, 0.41, 0.39],
    (ARMS[1], "literature"): [0.50, 0.52, 0.54],
    (ARMS[1], "fair"): [0.44, 0.45, 0.43],
}


def meta(**extra: Any) -> dict[str, Any]:
    arms = [
        {"label": a, "values": {"synthesis": v}, "display": {"synthesis": v}}
        for a, v in zip(ARMS, ["none", "symmetrical"], strict=True)
    ]
    return {
        "name": "paper",
        "factors": ["synthesis"],
        "arms": arms,
        "baseline": ARMS[0],
        "seeds": [0, 1, 2],
        "metric": "recall@1",
        "n_trials": 0,
        "tune_params": [],
        **extra,
    }


def write_store(
    results: Path, name: str, study_meta: dict[str, Any], runs: dict[tuple[str, str | None], list[float]]
) -> None:
    """A root study with ``study_meta`` and one COMPLETE final trial per (arm, protocol, seed)."""
    storage = store.open_storage(None, name, results, create=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("meta", study_meta)
    for (arm, protocol), values in runs.items():
        for seed, r1 in enumerate(values):
            attrs = {
                "stage": "final",
                "arm": arm,
                "seed": seed,
                "arm_display": {"synthesis": arm[-4:]},
                "metrics": {"test/recall@1": r1, "test/recall@2": r1 + 0.1, "test/map@r": r1 / 2},
            }
            if protocol is not None:
                attrs["protocol"] = protocol
            study.add_trial(optuna.trial.create_trial(value=r1, user_attrs=attrs))


def test_paper_table_has_published_literature_fair_and_differences(tmp_path: Path) -> None:
    unpublished = ["the learning-rate schedule of SOP", "the random seed"]
    labels = {ARMS[1]: "Triplet + Symm"}  # the other arm's label is made from its levels
    write_store(tmp_path, "paper", meta(published=PUBLISHED, unpublished=unpublished, labels=labels), R1)
    folder = report.write_report("paper", results=tmp_path)
    table = pd.read_csv(folder / "tables/paper.csv", index_col=["arm", "metric"])
    assert list(table.index) == [(a, m) for a in ARMS for m in ("recall@1", "recall@2", "nmi")]
    for arm in ARMS:
        row = table.loc[(arm, "recall@1")]
        lit, fair = pd.Series(R1[(arm, "literature")]), pd.Series(R1[(arm, "fair")])
        assert row.published == pytest.approx(PUBLISHED[arm]["recall@1"] / 100)
        assert row.source == PUBLISHED[arm]["source"]
        assert (row.literature_mean, row.literature_std, row.literature_n) == pytest.approx(
            (lit.mean(), lit.std(), 3)
        )
        assert (row.fair_mean, row.fair_std, row.fair_n) == pytest.approx((fair.mean(), fair.std(), 3))
        low, high = scipy.stats.t.interval(0.95, 2, loc=fair.mean(), scale=fair.std() / np.sqrt(3))
        assert row.fair_ci95 == pytest.approx((high - low) / 2)  # the fair protocol's mean ± 95 % CI
        assert row.delta_literature_published == pytest.approx(lit.mean() - row.published)
        assert row.delta_fair_literature == pytest.approx(fair.mean() - lit.mean())
        nmi = table.loc[(arm, "nmi")]  # published but not measured: ours and Δ are missing
        assert nmi.published == pytest.approx(PUBLISHED[arm]["nmi"] / 100) and pd.isna(nmi.literature_mean)
        assert pd.isna(nmi.delta_literature_published)
    md = (folder / "tables/paper.md").read_text()
    assert (
        "Not published (our choice): the learning-rate schedule of SOP; the random seed" in md.splitlines()[0]
    )
    row = next(line for line in md.splitlines() if line.startswith("| Triplet + Symm | Recall@1 |"))
    assert "| 55.0 | Table 1, row 'Triplet + Symm' | 52.0 ± 5.0 (3) | 44.0 ± 2.5 (3) | -3.0 | -8.0 |" in row
    assert "| No synthesis | Recall@1 |" in md and "synthesis=" not in md.split("\n", 1)[1]
    tex = (folder / "tables/paper.tex").read_text()
    assert "52.0 $\\pm$ 5.0 (3)" in tex and "\\toprule" in tex and "Triplet + Symm &" in tex
    overview = (folder / "report.md").read_text()
    assert overview.index("## Published vs ours") < overview.index("## Comparison")
    # the comparison table is the fair protocol's
    comparison = pd.read_csv(folder / "tables/comparison.csv", index_col="arm")
    assert comparison.loc[ARMS[1], "recall@1_mean"] == pytest.approx(0.44)


def test_runs_without_a_protocol_are_fair_and_a_study_without_published_has_no_paper_table(
    tmp_path: Path,
) -> None:
    write_store(tmp_path, "plain", meta(), {(a, None): v for (a, p), v in R1.items() if p == "fair"})
    folder = report.write_report("plain", results=tmp_path)
    assert not (folder / "tables/paper.csv").exists()
    assert "Published vs ours" not in (folder / "report.md").read_text()


def test_literature_runs_alone_make_a_paper_table_of_the_measured_metrics(tmp_path: Path) -> None:
    write_store(tmp_path, "lit", meta(), {(a, p): v for (a, p), v in R1.items() if p == "literature"})
    folder = report.write_report("lit", results=tmp_path)
    table = pd.read_csv(folder / "tables/paper.csv", index_col=["arm", "metric"])
    assert set(table.index.get_level_values("metric")) == {"recall@1", "recall@2", "map@r"}
    assert table.published.isna().all() and (table.fair_n == 0).all() and (table.literature_n == 3).all()
    comparison = pd.read_csv(folder / "tables/comparison.csv", index_col="arm")
    assert comparison.loc[ARMS[1], "recall@1_mean"] == pytest.approx(0.52)
