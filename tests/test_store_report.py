"""The results store's DataFrame and the report files (tables parse back and match the stored runs)."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from test_study import tiny_study, write

from harness import config, report, store, study
from harness.cli import main
from harness.errors import ConfigError, HarnessError
from harness.reporting import caveats, plots
from harness.reporting.figures import arm_palette
from harness.reporting.status import status
from harness.reporting.tables import arm_titles

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
    """A finished study with a numeric factor and a tune stage (for importances and factor plots); its arms
    are not in alphabetical order (the figures must follow the study's)."""
    tmp = tmp_path_factory.mktemp("tuned")
    spec = tiny_study(
        "tuned",
        arms={"model.embedding_dim": [8, 4]},
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
    titles = arm_titles(df.attrs["meta"], ARMS)  # human labels, never config syntax
    assert titles["mining=batch_hard, synthesis=symmetrical"] == "Batch hard + Symmetrical"
    row = next(line for line in md.splitlines() if line.startswith(f"| {titles[best]} |"))
    assert f"**{100 * table.loc[best, 'recall@1_mean']:.1f} ± " in row
    tex = (grid / "grid/tables/comparison.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{" in tex and "Batch hard + Symmetrical &" in tex
    assert "mining=" not in tex and "mining=" not in md


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
        md = (grid / f"grid/tables/ablation_{factor.replace('.', '_')}.md").read_text()
        rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
        assert "(+" not in rows[0] and "(-" not in rows[0]  # no (+0.0) on the baseline row
        assert "(+" in rows[1] or "(-" in rows[1]


def test_plots_and_overview_are_written(grid: Path) -> None:
    plots = grid / "grid/plots"
    for stem in ("recall_1_per_arm", "heatmap_loss_mining_x_synthesis", "learning_curves", "diagnostics"):
        assert (plots / f"{stem}.png").stat().st_size > 1000 and (plots / f"{stem}.svg").is_file()
    overview = (grid / "grid/report.md").read_text()
    assert (
        "8 of 8 final runs complete" in overview
        and "![Validation Recall@1 per epoch](plots/learning_curves.png)" in overview
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
    assert "finished" in text and "test/recall@1 mean" in text and "time:" in text
    assert all(arm in text for arm in ARMS)


def test_numeric_factor_and_importance_plots(tuned: Path) -> None:
    folder = report.write_report("tuned", results=tuned)
    assert (folder / "plots/recall_1_vs_model_embedding_dim.png").is_file()
    imp = pd.read_csv(folder / "tables/param_importances.csv")
    assert set(imp.arm) == {"embedding_dim=4", "embedding_dim=8"} and set(imp.param) == {"optimizer.lr"}
    assert (folder / "plots/param_importances.svg").is_file()
    df = store.load("tuned", results=tuned)
    assert sorted(df.stage.value_counts().items()) == [("final", 2), ("tune", 6)]
    # the final run of seed 0 trains again: the best tune run (same seed) never embedded the test classes
    assert df[df.stage == "final"].reused_from.isna().all()


def test_tuned_table_shows_the_values_the_final_runs_used(tuned: Path) -> None:
    folder = report.write_report("tuned", results=tuned)
    table = pd.read_csv(folder / "tables/tuned.csv", index_col="arm")
    df = store.load("tuned", results=tuned)
    final, tune = df[df.stage == "final"].set_index("arm"), df[df.stage == "tune"]
    np.testing.assert_allclose(table["optimizer.lr"], final.loc[table.index, "optimizer.lr"], rtol=1e-12)
    best = tune.groupby("arm")["value"].max().loc[table.index]
    np.testing.assert_allclose(table["best val Recall@1 (%)"], (100 * best).round(1))
    assert table["tune trials"].tolist() == [3, 3]
    # the final run reruns the arm's best tune trial, so its lr is that trial's lr
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
    for _, attrs in page.tags:  # nothing loads from elsewhere, not even relatively (links: the crawl below)
        assert (attrs.get("src") or "data:").startswith("data:")
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


# -- figures, the page's links, caveats, test classes only in final runs ----------------------------------


def _arm_colours(fig: Figure, arms: list[str]) -> dict[str, tuple[float, float, float]]:
    """The colour each arm has in ``fig``, read back from its artists: legend entries, bars labelled with the
    arm (seaborn's hue containers), or bars on an axis whose tick labels are the arms."""
    found: dict[str, list[tuple[float, float, float]]] = {}
    axes = fig.axes
    legends = [*fig.legends, *(ax.get_legend() for ax in axes if ax.get_legend() is not None)]
    for legend in legends:
        for text, handle in zip(legend.texts, legend.legend_handles, strict=True):
            colour = handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor()
            found.setdefault(text.get_text(), []).append(to_rgb(colour))
    for ax in axes:
        ticks = {round(t.get_position()[1], 3): t.get_text() for t in ax.get_yticklabels()}
        for container in ax.containers:
            for bar in getattr(container, "patches", []):
                label = container.get_label()
                if label not in arms:  # a bar per category: its arm is the tick label at its height
                    label = ticks.get(round(bar.get_y() + bar.get_height() / 2, 3), "")
                found.setdefault(label, []).append(to_rgb(bar.get_facecolor()))
    out = {}
    for arm, colours in found.items():
        if arm in arms:
            assert len(set(colours)) == 1, f"{arm} has several colours in one figure: {set(colours)}"
            out[arm] = colours[0]
    return out


def test_every_figure_gives_each_arm_the_same_colour(tuned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: dict[str, Figure] = {}
    original = Figure.savefig

    def keep(fig: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        saved[Path(str(fname)).stem] = fig  # kept open: its artists are read below
        original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    report.write_report("tuned", results=tuned)
    arms = ["embedding_dim=8", "embedding_dim=4"]  # the study's order (not alphabetical)
    want = {arm: to_rgb(c) for arm, c in arm_palette(arms).items()}
    coloured = {stem: _arm_colours(fig, arms) for stem, fig in saved.items()}
    for stem in ("recall_1_per_arm", "learning_curves", "diagnostics", "param_importances"):
        assert set(coloured[stem]) == set(arms), stem
    for stem, colours in coloured.items():
        assert colours == {arm: want[arm] for arm in colours}, stem
    # the t-SNE map has a class legend; the diagnostics panels say what they show and in which unit
    legend = saved["embedding_maps"].legends[0]
    assert legend.get_title().get_text() == "test class" and len(legend.texts) >= 2
    panels = [ax for ax in saved["diagnostics"].axes if ax.get_visible()]
    for ax in panels:
        assert ax.get_title() and "_" not in ax.get_title() and not re.search(r"\w/\w", ax.get_title())
        assert ax.get_ylabel() not in ("", "value")
    assert {"Loss: mean same-class distance", "Loss: active triplets or pairs (non-zero loss)"} <= {
        ax.get_title() for ax in panels
    }


class _Links(HTMLParser):
    """The targets of a page's links and images, and its figure captions."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.captions: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.targets += [v or "" for k, v in attrs if k in ("href", "src")]
        if tag == "figcaption":
            self._in_caption = True
            self.captions.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_caption = self._in_caption and tag != "figcaption"

    def handle_data(self, data: str) -> None:
        if self._in_caption:
            self.captions[-1] += data


def test_every_link_of_the_html_report_resolves_and_captions_say_what_a_figure_shows(grid: Path) -> None:
    folder = grid / "grid"
    page = _Links()
    page.feed((folder / "report.html").read_text())
    files = [t for t in page.targets if not t.startswith(("data:", "#"))]
    assert any(f.endswith(".svg") for f in files) and any(f.endswith(".pdf") for f in files)
    missing = [f for f in files if not (folder / unquote(urlsplit(f).path)).is_file()]
    assert not missing, missing
    stems = {p.stem for p in (folder / "plots").glob("*.png")}
    assert len(page.captions) == len(stems) >= 6
    for caption in page.captions:
        assert len(caption) > 80 and not any(caption.startswith(s) for s in stems), caption
    assert any("shaded band = 95% bootstrap CI" in c for c in page.captions if "per epoch" in c)


def test_weak_numbers_are_warned_once_in_the_report_and_the_log(
    tuned: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="harness"):
        folder = report.write_report("tuned", results=tuned)
    md = (folder / "report.md").read_text()
    head = md[: md.index("## Comparison")]
    assert "## Caveats" in head
    expected = (
        "Parameter importances rest on fewer than 20",
        "Validation on 2 classes",
        "Fewer than 3 seeds",
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for text in expected:
        assert head.count(text) == 1 and sum(text in w for w in warned) == 1, text
    assert "<ul><li>" in (folder / "report.html").read_text()
    said = [r.getMessage() for r in caplog.records if r.name == "harness.report"]
    for where in ("report.html", "tables", "plots"):
        assert sum(str(folder / where) in line for line in said) == 1, where


def test_a_saturated_validation_metric_is_a_caveat() -> None:
    def runs(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "stage": "tune",
                "state": "COMPLETE",
                "arm": "a",
                "val/recall@1": values,
                "data/val_classes": 8.0,
            }
        )

    said = caveats.validation_caveats(runs([0.995, 1.0, 0.98]), "recall@1")
    assert len(said) == 1 and "Recall@1 is at least 99% in 2 of 3 tune trials" in said[0]
    assert caveats.validation_caveats(runs([0.995, 0.9, 0.98]), "recall@1") == []  # 1 of 3: not most
    final = pd.DataFrame({"arm": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0]})
    assert "(b: 1)" in (caveats.seed_caveat(final) or "")


def test_tune_trials_never_embed_the_test_classes(tuned: Path) -> None:
    """Test classes are touched only by final runs: a tune trial stores no test metric and no test
    embeddings, and its config says so; every final run has both."""
    df = store.load("tuned", results=tuned)
    test_columns = [c for c in df.columns if c.startswith("test")]
    tune, final = df[df.stage == "tune"], df[df.stage == "final"]
    assert len(tune) == 6 and test_columns
    assert tune[test_columns].isna().all().all()
    assert final["test/recall@1"].notna().all() and final["val/recall@1"].notna().all()
    for run_dir in tune.run_dir:
        assert not (Path(run_dir) / "test_embeddings.npz").exists()
        assert yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["eval"]["test"] is False
    for run_dir in final.run_dir:
        assert (Path(run_dir) / "test_embeddings.npz").is_file()


def test_test_set_selection_needs_the_test_classes() -> None:
    with pytest.raises(ConfigError, match="train.best_test_every: evaluates the test classes"):
        config.validate({"eval": {"test": False}, "train": {"best_test_every": 1}})
