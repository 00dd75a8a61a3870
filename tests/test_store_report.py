"""The results store's DataFrame and the report files (tables parse back and match the stored runs)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_study import tiny_study, write

from harness import report, store, study
from harness.cli import main
from harness.errors import HarnessError
from harness.reporting import plots
from harness.reporting.status import status

ARMS = [
    "mining=batch_hard, synthesis=none",
    "mining=batch_hard, synthesis=symmetrical",
    "mining=all, synthesis=none",
    "mining=all, synthesis=symmetrical",
]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2 × 2 study (loss.mining × synthesis), two seeds, its report written by the runner."""
    tmp = tmp_path_factory.mktemp("grid")
    spec = tiny_study(
        "grid",
        arms={"loss.mining": ["batch_hard", "all"], "synthesis": [None, "symmetrical"]},
        baseline={"loss.mining": "batch_hard", "synthesis": None},
    )
    out = study.run_study(write(tmp, spec), results=tmp)
    assert out == tmp / "grid"
    return tmp


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished study with a numeric factor and a tune stage (for importances and factor plots)."""
    tmp = tmp_path_factory.mktemp("tuned")
    spec = tiny_study(
        "tuned",
        arms={"model.embedding_dim": [4, 8]},
        final={"seeds": [0]},
        tune={"n_trials": 3, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
    )
    study.run_study(write(tmp, spec), results=tmp, report=False)
    return tmp


def test_the_store_has_one_row_per_run_with_factors_metrics_and_files(grid: Path) -> None:
    df = store.load("grid", results=grid)
    assert len(df) == 8 and set(df.state) == {"COMPLETE"} and set(df.stage) == {"final"}
    assert sorted(df.arm.unique()) == sorted(ARMS) and sorted(df.seed) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert set(df["loss.mining"]) == {"batch_hard", "all"} and set(df["synthesis"]) == {"none", "symmetrical"}
    assert (df.duration > 0).all() and df.run_key.is_unique
    for _, row in df.iterrows():
        run_dir = Path(row["run_dir"])
        stored = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        assert {k: row[k] for k in stored} == stored
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == row["seed"]
    # the same DataFrame from the study folder or its journal file
    assert store.load(grid / "grid").equals(df) and store.load(grid / "grid" / "journal.log").equals(df)
    assert df.attrs["meta"]["factors"] == ["loss.mining", "synthesis"]


def test_comparison_table_parses_back_and_equals_the_stored_runs(grid: Path) -> None:
    df = store.load("grid", results=grid)
    table = pd.read_csv(grid / "grid/tables/comparison.csv", index_col="arm")
    assert list(table.index) == ARMS  # study order
    assert (table.runs == 2).all()
    for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
        stats = df.groupby("arm")[f"test/{metric}"].agg(["mean", "std"]).loc[ARMS]
        np.testing.assert_allclose(table[f"{metric}_mean"], stats["mean"], rtol=1e-12)
        np.testing.assert_allclose(table[f"{metric}_std"], stats["std"], rtol=1e-12)  # sample std over seeds
        assert table[f"{metric}_best"].tolist() == np.isclose(stats["mean"], stats["mean"].max()).tolist()
    md = (grid / "grid/tables/comparison.md").read_text()
    best = table["recall@1_mean"].idxmax()
    row = next(line for line in md.splitlines() if line.startswith(f"| {best} |"))
    assert f"**{100 * table.loc[best, 'recall@1_mean']:.1f} ± " in row
    tex = (grid / "grid/tables/comparison.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{" in tex and "mining=batch\\_hard" in tex


def test_ablation_tables_give_deltas_against_the_baseline(grid: Path) -> None:
    table = pd.read_csv(grid / "grid/tables/comparison.csv", index_col="arm")
    base = table.loc["mining=batch_hard, synthesis=none"]
    for factor, other in (
        ("loss.mining", "mining=all, synthesis=none"),
        ("synthesis", "mining=batch_hard, synthesis=symmetrical"),
    ):
        ab = pd.read_csv(grid / f"grid/tables/ablation_{factor.replace('.', '_')}.csv", index_col="arm")
        assert list(ab.index) == ["mining=batch_hard, synthesis=none", other]
        assert ab.loc[other, "recall@1_delta"] == pytest.approx(
            table.loc[other, "recall@1_mean"] - base["recall@1_mean"]
        )
        assert ab.iloc[0]["map@r_delta"] == 0
        assert (grid / f"grid/tables/ablation_{factor.replace('.', '_')}.md").read_text().count("(+0.0)") >= 6


def test_plots_and_overview_are_written(grid: Path) -> None:
    plots = grid / "grid/plots"
    for stem in ("recall_1_per_arm", "heatmap_loss_mining_x_synthesis", "learning_curves", "diagnostics"):
        assert (plots / f"{stem}.png").stat().st_size > 1000 and (plots / f"{stem}.svg").is_file()
    overview = (grid / "grid/report.md").read_text()
    assert (
        "8 of 8 final runs complete" in overview
        and "![learning_curves](plots/learning_curves.png)" in overview
    )


def test_report_is_idempotent_and_takes_a_baseline_option(
    grid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (grid / "grid/tables/comparison.csv").read_text()
    assert (
        main(["--results", str(grid), "report", "grid", "--baseline", "synthesis=symmetrical, mining=all"])
        == 0
    )
    assert "written to" in capsys.readouterr().out
    assert (grid / "grid/tables/comparison.csv").read_text() == before
    ab = pd.read_csv(grid / "grid/tables/ablation_synthesis.csv", index_col="arm")
    assert ab.loc["mining=all, synthesis=symmetrical", "recall@1_delta"] == 0
    with pytest.raises(HarnessError, match="matches no arm"):
        report.write_report("grid", results=grid, baseline="mining=semi_hard")


def test_status_shows_counts_best_arms_and_time(grid: Path) -> None:
    text = status("grid", results=grid)
    assert "COMPLETE" in text and "test/recall@1 mean" in text and "time:" in text
    assert all(arm in text for arm in ARMS)


def test_numeric_factor_and_importance_plots(tuned: Path) -> None:
    folder = report.write_report("tuned", results=tuned)
    assert (folder / "plots/recall_1_vs_model_embedding_dim.png").is_file()
    imp = pd.read_csv(folder / "tables/param_importances.csv")
    assert set(imp.arm) == {"embedding_dim=4", "embedding_dim=8"} and set(imp.param) == {"optimizer.lr"}
    assert (folder / "plots/param_importances.svg").is_file()
    df = store.load("tuned", results=tuned)
    assert sorted(df.stage.value_counts().items()) == [("final", 2), ("tune", 6)]
    assert df[df.stage == "final"].reused_from.notna().all()  # seed 0 is the best tune run itself


def test_tuned_table_shows_the_values_the_final_runs_used(tuned: Path) -> None:
    folder = report.write_report("tuned", results=tuned)
    table = pd.read_csv(folder / "tables/tuned.csv", index_col="arm")
    df = store.load("tuned", results=tuned)
    final, tune = df[df.stage == "final"].set_index("arm"), df[df.stage == "tune"]
    np.testing.assert_allclose(table["optimizer.lr"], final.loc[table.index, "optimizer.lr"], rtol=1e-12)
    best = tune.groupby("arm")["value"].max().loc[table.index]
    np.testing.assert_allclose(table["best val Recall@1 (%)"], (100 * best).round(1))
    assert table["tune trials"].tolist() == [3, 3]
    # the final run reuses the arm's best tune trial, so its lr is that trial's lr
    for arm, row in final.iterrows():
        mine = tune[tune.arm == arm]
        assert row["optimizer.lr"] in set(mine[mine.value == mine.value.max()]["optimizer.lr"])
    assert "## Tuned hyperparameters" in (folder / "report.md").read_text()


def test_a_variant_factor_is_a_column_of_the_store_and_of_its_ablation_table(tmp_path: Path) -> None:
    arms = {
        "method": {"hard": {"loss.mining": "batch_hard"}, "all": {"loss.mining": "all", "loss.margin": 0.3}}
    }
    spec = tiny_study("variants", arms=arms, baseline={"method": "hard"}, final={"seeds": [0]})
    folder = study.run_study(write(tmp_path, spec), results=tmp_path)
    df = store.load("variants", results=tmp_path)
    assert sorted(df["method"]) == ["all", "hard"] and sorted(df.arm) == ["method=all", "method=hard"]
    table = pd.read_csv(folder / "tables/ablation_method.csv", index_col="arm")
    assert sorted(table["method"]) == [
        "all",
        "hard",
    ]  # (write() sorts the YAML's keys: study order is all, hard)
    delta = table.loc["method=all", "recall@1_mean"] - table.loc["method=hard", "recall@1_mean"]
    assert table.loc["method=all", "recall@1_delta"] == pytest.approx(delta)


def test_report_mid_study_and_of_an_unknown_study(tmp_path: Path) -> None:
    spec = study.parse_study(tiny_study("fresh"))
    study.queue.prepare(store.open_storage(None, "fresh", tmp_path, create=True), spec)
    folder = report.write_report("fresh", results=tmp_path)
    assert "No final run has completed yet" in (folder / "report.md").read_text()
    assert "0 trials" in status("fresh", results=tmp_path)
    with pytest.raises(HarnessError, match="no study 'nope'"):
        report.write_report("nope", results=tmp_path)


def test_list_valued_factors_are_numeric_by_length() -> None:
    meta = {
        "arms": [
            {"values": {"levels": [1, 2], "m": 2, "loss": "a"}},
            {"values": {"levels": [1, 2, 3], "m": 4.0, "loss": None}},
        ]
    }
    assert [plots.factor_kind(meta, f) for f in ("levels", "m", "loss")] == [
        "length",
        "numeric",
        "categorical",
    ]


class _Page(HTMLParser):
    """Every tag and attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_the_html_report_is_self_contained(grid: Path) -> None:
    text = (grid / "grid/report.html").read_text()
    page = _Page()
    page.feed(text)
    tags = [t for t, _ in page.tags]
    assert not {"script", "link", "iframe", "object", "embed"} & set(tags)
    images = [a["src"] or "" for t, a in page.tags if t == "img"]
    md = (grid / "grid/report.md").read_text()
    assert len(images) == md.count("![") >= 6  # per-arm, curves, diagnostics, two retrieval grids, t-SNE map
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, attrs in page.tags:  # nothing loads from elsewhere, not even relatively
        assert all(k not in ("src", "href") or (v or "").startswith("data:") for k, v in attrs.items())
    assert tags.count("table") == md.count("|:---|") + 1  # the report's tables and the environment
    assert tags.count("details") == len(ARMS) and "loss:" in text  # each arm's resolved config
    assert "Environment" in text and "torch" in text and "harness commit" in text


def test_the_html_report_renders_in_a_headless_browser(grid: Path, tmp_path: Path) -> None:
    """Chromium (Debian's package, installed by .ci/run) loads every image and logs no script error."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    probe = tmp_path / "report.html"
    check = (
        "<script>window.addEventListener('load', () => { const i = [...document.images]; document.title = "
        "'images ' + i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length; });</script>"
    )
    probe.write_text((grid / "grid/report.html").read_text().replace("</body>", check + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(
        [browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180
    )
    n = (grid / "grid/report.md").read_text().count("![")
    assert f"<title>images {n}/{n}</title>" in done.stdout, done.stderr[-2000:]
    assert "CONSOLE" not in done.stderr and "Uncaught" not in done.stderr
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            *flags,
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            (grid / "grid/report.html").as_uri(),
        ],
        capture_output=True,
        timeout=180,
    )
    assert shot.stat().st_size > 10_000
