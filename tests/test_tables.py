"""Tables a paper can take unchanged (issue #26): bold only where the paired test supports it, marks and
legends, human arm labels, LaTeX that compiles in a two-column article without overfull boxes, and
``dmlh table``'s methods × datasets table across studies (hand-written stores: no training)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from harness import config, report, store
from harness.cli import main
from harness.errors import ConfigError
from harness.reporting import stats
from harness.reporting.tables import TEX_REQUIRES, arm_titles, cell, display

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]


def _long(columns: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """``{column: {row: values by seed}}`` as ``stats.bold_cells`` takes it."""
    return pd.DataFrame(
        [
            {"column": c, "row": r, "seed": s, "value": v}
            for c, rows in columns.items()
            for r, values in rows.items()
            for s, v in enumerate(values)
        ]
    )


# -- honest bold -------------------------------------------------------------------------------------------


def test_arms_the_test_cannot_tell_from_the_best_are_bold_and_a_clearly_worse_one_is_not() -> None:
    """The issue's case: 88.3 ± 5.4 beside 87.6 ± 5.2 (not distinguishable) had only the first in bold."""
    best = [0.83, 0.88, 0.94]
    close = [0.87, 0.82, 0.938]  # mean 87.6: noisy pairs, p well above 0.05
    worse = [0.70, 0.75, 0.80]  # every seed 13 points below the best: p = 0
    out = stats.bold_cells(_long({"r1": {"a": best, "b": close, "c": worse}}))
    assert out.loc[("r1", "b"), "p_holm"] > 0.05 and out.loc[("r1", "c"), "p_holm"] < 0.05
    assert out.bold.tolist() == [True, True, False]


def test_equal_values_as_shown_are_both_bold() -> None:
    """97.9 vs 97.9: the second is below the first on every seed (p = 0), yet prints the same number."""
    a = [0.9790, 0.9791, 0.9789]
    b = [v - 0.0004 for v in a]
    out = stats.bold_cells(_long({"r2": {"a": a, "b": b, "c": [v - 0.01 for v in a]}}))
    assert out.loc[("r2", "b"), "p"] < 0.05
    assert out.bold.tolist() == [True, True, False]


def test_holm_corrects_across_the_whole_table() -> None:
    ref = [0.03, 0.06, 0.06]  # Holm by hand: sorted p × (3, 2, 1), running maximum
    assert stats.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx(ref)
    assert np.isnan(stats.holm([np.nan, 0.2])[0]) and stats.holm([np.nan, 0.2])[1] == pytest.approx(0.2)
    # one column alone: p < 0.05, not bold; the same cell in a table of 3 tests: Holm ≥ 0.05, bold
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.05, 5)
    diff = np.array([0.011, 0.02, 0.008, 0.013, 0.018])  # p ≈ 0.003 alone
    one = stats.bold_cells(_long({"m": {"a": list(base), "b": list(base - diff)}}))
    assert not one.loc[("m", "b"), "bold"]
    others = {f"m{i}": {"a": list(base), "b": list(base - 0.01 * rng.normal(0, 1, 5))} for i in range(30)}
    many = stats.bold_cells(_long({"m": {"a": list(base), "b": list(base - diff)}, **others}))
    assert many.loc[("m", "b"), "p"] == pytest.approx(one.loc[("m", "b"), "p"])
    assert many.loc[("m", "b"), "p_holm"] >= 0.05 and many.loc[("m", "b"), "bold"]


# -- cells, marks, labels ----------------------------------------------------------------------------------


def test_cells_mark_few_seeds_and_show_missing_as_a_dash() -> None:
    assert cell(0.5, 0.01, 3, bold=True) == "**50.0 ± 1.0**"
    assert cell(0.5, 0.01, 2) == "50.0 ± 1.0†" and cell(0.5, float("nan"), 1) == "50.0†"
    assert cell(float("nan"), float("nan"), 0) == "—"


def test_the_baseline_row_has_no_delta_and_few_seeds_are_marked() -> None:
    summary = pd.DataFrame(
        {
            "runs": [2, 2],
            "recall@1_mean": [0.5, 0.6],
            "recall@1_std": [0.01, 0.02],
            "recall@1_seeds": [2, 2],
            "recall@1_bold": [False, True],
        },
        index=pd.Index(["loss=a", "loss=b"], name="arm"),
    )
    deltas = {"recall@1": pd.Series([0.0, 0.1])}
    shown = display(summary, ["recall@1"], deltas, baseline="loss=a", titles={"loss=a": "A", "loss=b": "B"})
    assert shown["Recall@1 (%)"].tolist() == ["50.0 ± 1.0†", "**60.0 ± 2.0 (+10.0)**†"]
    assert shown["arm"].tolist() == ["A", "B"]


def test_arm_labels_are_human_from_the_study_or_its_levels() -> None:
    levels = [
        {"loss": "multi_similarity", "synthesis": "none"},
        {"loss": "triplet", "synthesis": "symmetrical"},
        {"ensemble": "abe", "model.m": "8"},
        {"regularizers.0.levels": "[-3,0,3]"},
    ]
    arms = [{"label": ", ".join(f"{k}={v}" for k, v in d.items()), "display": d} for d in levels]
    meta = {"arms": arms, "labels": {"ensemble=abe, model.m=8": "ABE-8"}}
    titles = arm_titles(meta, [a["label"] for a in meta["arms"]])
    assert list(titles.values()) == [
        "Multi similarity",
        "Triplet + Symmetrical",
        "ABE-8",
        "Levels = [-3, 0, 3]",
    ]


def test_a_labels_key_that_is_no_arm_is_an_error() -> None:
    from test_study import tiny_study

    from harness.study import parse_study

    spec = tiny_study(arms={"loss.mining": ["all", "batch_hard"]})
    assert parse_study({**spec, "labels": {"mining=all": "Batch all"}}).meta()["labels"] == {
        "mining=all": "Batch all"
    }
    with pytest.raises(ConfigError, match="labels.mining=hard: not an arm label"):
        parse_study({**spec, "labels": {"mining=hard": "Hard"}})


# -- a report and `dmlh table` of a hand-written store, compiled with pdflatex -----------------------------

ARMS = {  # arm label -> (display, recall@1 by seed, recall@2 by seed)
    "loss=triplet, synthesis=none": (
        {"loss": "triplet", "synthesis": "none"},
        [0.83, 0.88, 0.94],
        [0.9790, 0.9791, 0.9789],
    ),
    "loss=triplet, synthesis=symmetrical": (
        {"loss": "triplet", "synthesis": "symmetrical"},
        [0.87, 0.82, 0.938],
        [0.9786, 0.9787, 0.9785],
    ),
    "loss=multi_similarity, synthesis=none": (
        {"loss": "multi_similarity", "synthesis": "none"},
        [0.70, 0.75, 0.80],
        [0.900, 0.901, 0.902],
    ),
    "loss=multi_similarity, synthesis=symmetrical": (
        {"loss": "multi_similarity", "synthesis": "symmetrical"},
        [0.72, 0.74, 0.81],
        [0.900, 0.902, 0.903],
    ),
}
BASE = "loss=triplet, synthesis=none"


def _metrics(r1: float, r2: float) -> dict[str, float]:
    return {
        "test/recall@1": r1,
        "test/recall@2": r2,
        "test/recall@4": min(1.0, r2 + 0.01),
        "test/recall@8": min(1.0, r2 + 0.015),
        "test/map@r": r1 / 2,
        "test/r_precision": r1 / 1.8,
        "test_learner1/recall@1": r1 - 0.1,
        "test_learner2/recall@1": r1 - 0.12,
    }


def _write_store(results: Path) -> None:
    """Study ``tables`` (loss × synthesis on CUB): fair and literature final runs, tune trials, published
    numbers, a recipe, labels and notes with characters LaTeX must escape."""
    raw = config.load_yaml(REPO / "studies/paper_cub200.yaml")
    meta = {
        "name": "tables",
        "factors": ["loss", "synthesis"],
        "arms": [{"label": a, "values": d, "display": d} for a, (d, _, _) in ARMS.items()],
        "baseline": BASE,
        "seeds": SEEDS,
        "metric": "recall@1",
        "n_trials": 2,
        "tune_params": ["optimizer.lr"],
        "published": {
            BASE: {"source": "Table 1, row 'Triplet' (50% of ~runs)", "recall@1": 86.0, "nmi": 60.0}
        },
        "unpublished": ["seeds: we run 3 per arm & the order #1_a"],
        "recipe": copy.deepcopy(raw["recipe"]),
        "notes": ["multi_similarity uses α = 2 → β; 5% of pairs_x"],
        "labels": {"loss=triplet, synthesis=symmetrical": "Triplet + Symm"},
        "spec": {"base": {"data": {"dataset": {"name": "cub200"}}}},
    }
    storage = store.open_storage(None, "tables", results, create=True)
    study = optuna.create_study(study_name="tables", storage=storage, direction="maximize")
    study.set_user_attr("meta", meta)
    for arm, (shown, r1, r2) in ARMS.items():
        tune = optuna.create_study(study_name=store.tune_study_name("tables", arm), storage=storage)
        for slot in range(2):
            attrs = {"stage": "tune", "arm": arm, "slot": slot, "tuned": {"optimizer.lr": 1e-4 * (slot + 1)}}
            tune.add_trial(optuna.trial.create_trial(value=0.5 + 0.01 * slot, user_attrs=attrs))
        for protocol, shift in (("fair", 0.0), ("literature", -0.02)):
            for seed in SEEDS[: 3 if protocol == "fair" else 2]:  # 2 literature seeds: marked
                attrs = {
                    "stage": "final",
                    "arm": arm,
                    "seed": seed,
                    "arm_display": shown,
                    "protocol": protocol,
                }
                attrs |= {"tuned": {"optimizer.lr": 1e-4}, "metrics": _metrics(r1[seed] + shift, r2[seed])}
                study.add_trial(optuna.trial.create_trial(value=r1[seed], user_attrs=attrs))


TABLE = {
    "name": "mine",
    "studies": ["tables", str(REPO / "studies/paper_abe_inshop.yaml")],  # one ran, one did not
    "methods": {
        "Triplet": BASE,
        "Triplet + Symm": {"tables": "loss=triplet, synthesis=symmetrical"},
        "MS": "loss=multi_similarity, synthesis=none",
        "ABE-8": "ensemble=abe, m=8, lambda_div=1",
    },
    "protocols": ["published", "fair"],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study's report, ``dmlh table`` of the table above and of studies/tables/seed_papers.yaml."""
    tmp = tmp_path_factory.mktemp("tables")
    _write_store(tmp)
    report.write_report("tables", results=tmp)
    (tmp / "mine.yaml").write_text(yaml.safe_dump(TABLE, sort_keys=False))
    assert main(["--results", str(tmp), "table", str(tmp / "mine.yaml")]) == 0
    seed = REPO / "studies/tables/seed_papers.yaml"
    assert main(["--results", str(tmp / "none"), "table", str(seed), "--out", str(tmp / "seed")]) == 0
    return tmp


def test_the_report_bolds_what_the_test_supports_with_a_legend(written: Path) -> None:
    md = (written / "tables/tables/comparison.md").read_text()
    rows = {
        line.split(" | ")[0].removeprefix("| "): line for line in md.splitlines() if line.startswith("| ")
    }
    assert "| **88.3 ± 5.5** | **97.9 ± 0.0** |" in rows["Triplet"]
    assert (
        "| **87.6 ± 5.9** | **97.9 ± 0.0** |" in rows["Triplet + Symm"]
    )  # not distinguishable; equal as shown
    assert "| 75.0 ± 5.0 | 90.1 ± 0.1 |" in rows["Multi similarity"]  # clearly worse: not bold
    assert "Bold: the best mean of each column and every cell a paired t-test" in md.splitlines()[-1]
    comparison = pd.read_csv(written / "tables/tables/comparison.csv", index_col="arm")
    assert comparison["recall@1_bold"].tolist() == [True, True, False, False]
    ablation = (written / "tables/tables/ablation_synthesis.md").read_text()
    base = next(line for line in ablation.splitlines() if line.startswith("| none |"))
    assert "(+" not in base and "(-" not in base  # no (+0.0) on the baseline row
    assert "(-0.7)" in next(line for line in ablation.splitlines() if line.startswith("| symmetrical |"))
    paper = (written / "tables/tables/paper.md").read_text()
    assert "| 83.5 ± 31.8 (2)† | 88.3 ± 13.7 (3) |" in paper  # ± 95 % CI; 2 literature seeds: marked
    assert "†: fewer than 3 seeds" in paper


def test_dmlh_table_sets_methods_beside_datasets_and_shows_missing_cells(written: Path) -> None:
    folder = written / "tables/mine"
    assert {p.name for p in folder.iterdir()} >= {
        "mine.md",
        "mine.csv",
        "mine.tex",
        "mine_wide.tex",
        "mine.html",
    }
    table = pd.read_csv(folder / "mine.csv", index_col=["method", "protocol", "dataset", "metric"])
    fair = table.xs("fair", level="protocol")
    assert fair.loc[("Triplet + Symm", "cub200", "recall@1"), "mean"] == pytest.approx(np.mean(ARMS[
        "loss=triplet, synthesis=symmetrical"][1]))  # fmt: skip
    assert (
        fair.loc[("Triplet", "cub200", "recall@1"), "bold"]
        and fair.loc[("Triplet + Symm", "cub200", "recall@1"), "bold"]
    )
    assert not fair.loc[("MS", "cub200", "recall@1"), "bold"]
    published = table.xs("published", level="protocol")
    assert published.loc[("Triplet", "cub200", "recall@1"), "mean"] == pytest.approx(0.86)
    assert published.loc[("ABE-8", "inshop", "recall@50"), "mean"] == pytest.approx(0.987)  # from the YAML
    # missing cells are missing, never 0: ABE-8 has no run, MS no published number, In-Shop no triplet
    assert pd.isna(fair.loc[("ABE-8", "inshop", "recall@1"), "mean"])
    assert pd.isna(published.loc[("MS", "cub200", "recall@1"), "mean"])
    assert pd.isna(fair.loc[("Triplet", "inshop", "recall@1"), "mean"])
    md = (folder / "mine.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "CUB-200-2011 R@1" in head and "In-Shop R@50" in head and "SOP" not in head
    abe = next(line for line in md.splitlines() if line.startswith("| ABE-8 | published"))
    assert abe.count("—") == 4 and "| 98.7 |" in abe
    assert "| 0.0 |" not in md and "Published: as printed in the paper, never bold" in md
    assert "<table>" in (folder / "mine.html").read_text()


def test_seed_papers_table_works_without_any_results(written: Path) -> None:
    md = (written / "seed/seed_papers.md").read_text()
    triplet = next(line for line in md.splitlines() if line.startswith("| Triplet | published"))
    assert triplet.startswith(
        "| Triplet | published | 35.9 | 47.7 | 59.1 | 70.0 | 45.1 |"
    )  # Gu & Ko, Table 1
    assert "| MDR (3 levels) | published |" in md and "**" not in md


def test_a_table_file_with_an_unknown_arm_or_two_studies_of_one_dataset_is_refused(tmp_path: Path) -> None:
    bad = {
        **TABLE,
        "studies": [str(REPO / "studies/paper_cub200.yaml"), str(REPO / "studies/paper_abe_cub200.yaml")],
    }
    either = {
        "paper_cub200": "loss=npair, synthesis=none",
        "paper_abe_cub200": "ensemble=abe, m=8, lambda_div=1",
    }
    bad["methods"] = {"Typo": "loss=tripplet, synthesis=none", "Either": either}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    from harness.reporting.combined import write_combined

    with pytest.raises(ConfigError) as e:
        write_combined(tmp_path / "bad.yaml", results=tmp_path)
    assert "methods.Typo: no study has an arm 'loss=tripplet, synthesis=none'" in str(e.value)
    assert "methods.Either: two studies of cub200 (paper_cub200, paper_abe_cub200)" in str(e.value)


def _compile(tex: Path, work: Path) -> str:
    """The pdflatex output for ``tex`` pasted into a two-column article with the packages its first line
    names."""
    text = tex.read_text()
    packages = re.findall(r"\\usepackage\{[^}]+\}", text.splitlines()[0])
    doc = work / f"{tex.parent.name}-{tex.stem}.tex"
    doc.write_text(
        "\\documentclass[twocolumn]{article}\n" + "\n".join(packages) + "\n\\begin{document}\n"
        f"{text}\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout + ("" if done.returncode == 0 else f"\nexit status {done.returncode}")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (texlive-latex-recommended)")
def test_every_latex_table_compiles_in_a_two_column_article_without_overfull_boxes(
    written: Path, tmp_path: Path
) -> None:
    files = sorted(written.glob("tables/*/*.tex")) + sorted((written / "seed").glob("*.tex"))
    names = {f"{p.parent.name}/{p.name}" for p in files}
    expected = ["comparison", "ablation_loss", "significance", "effects", "interactions", "paper", "recipe"]
    expected += ["tuned", "learners"]
    assert {f"tables/{n}.tex" for n in expected} | {"mine/mine_wide.tex", "seed/seed_papers.tex"} <= names
    problems = []
    for tex in files:
        assert tex.read_text().splitlines()[0] == TEX_REQUIRES
        log = _compile(tex, tmp_path)
        errors = [line for line in log.splitlines() if line.startswith(("!", "exit status"))]
        overfull = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide", log)]
        if errors or any(w > 1.0 for w in overfull):
            problems.append(f"{tex.parent.name}/{tex.name}: {errors} overfull by {overfull} pt")
    assert not problems, "\n".join(problems)


def test_the_readme_table_snippet_is_a_valid_table_file() -> None:
    """The README's `dmlh table` file validates against the table schema (the docs cannot drift)."""
    from harness.reporting.combined import TableSpec

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("studies:")]
    assert blocks
    for block in blocks:
        TableSpec.model_validate(yaml.safe_load(block))
