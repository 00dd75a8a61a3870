"""A study's report from the results store only (any time, also mid-study): report.md, report.html,
tables/ and plots/.

Every number in a table is the mean ± sample std (ddof=1) over the final stage's seeds of a test-split
metric; nothing in a table was selected on test classes. The parts live in ``harness.reporting``: table
formats (``tables``), study plots (``plots``), method pictures (``diagnostics``, ``figures``), statistics
(``stats``), the paper table (``paper``), the per-learner table of ensembles (``learners``), warnings about
weak numbers (``caveats``) and the HTML page (``page``); this module decides what a study's report contains
and in which order.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness import store
from harness.errors import HarnessError
from harness.reporting import caveats, effects, learners, page, paper, plots, search, stats
from harness.reporting import diagnostics as method_diagnostics
from harness.reporting import figures as pictures
from harness.reporting.tables import arm_titles, display, is_best, legend, to_markdown, write_table
from harness.types import TABLE_METRICS, metric_title, recall_k

log = logging.getLogger(__name__)


def table_metrics(df: pd.DataFrame) -> list[str]:
    """The test metrics the tables show: Recall@K by K, MAP@R, R-Precision (those present)."""
    names = [c.removeprefix("test/") for c in df.columns if c.startswith("test/")]
    recalls = sorted((m for m in names if recall_k(m) is not None), key=lambda m: recall_k(m) or 0)
    return recalls + [m for m in TABLE_METRICS if m in names]


def final_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The complete final-stage runs (one per arm and seed)."""
    if df.empty:
        return df
    return df[(df.stage == "final") & (df.state == "COMPLETE")]


def _arm_order(meta: dict[str, Any], arms: Sequence[str]) -> list[str]:
    order = [a["label"] for a in meta.get("arms", [])]
    return [a for a in order if a in set(arms)] + sorted(set(arms) - set(order))


def summarize(final: pd.DataFrame, metrics: list[str], meta: dict[str, Any]) -> pd.DataFrame:
    """Rows = arms (study order); columns = factor values, ``runs``, and per metric ``<m>_mean``, ``<m>_std``
    (over seeds, ddof=1), ``<m>_seeds``, ``<m>_best`` (the highest mean of the column) and ``<m>_bold``,
    ``<m>_p_holm`` (``with_bold``)."""
    factors = [f for f in meta.get("factors", []) if f in final]
    grouped = final.groupby("arm", sort=False)
    out = pd.DataFrame(index=pd.Index(_arm_order(meta, list(grouped.groups)), name="arm"))
    for f in factors:
        out[f] = grouped[f].first()
    out["runs"] = grouped.size()
    for m in metrics:
        agg = grouped[f"test/{m}"].agg(["mean", "std", "count"])
        out[f"{m}_mean"] = agg["mean"]
        out[f"{m}_std"] = agg["std"]
        out[f"{m}_seeds"] = agg["count"]
        out[f"{m}_best"] = is_best(out[f"{m}_mean"])
    return with_bold(out, final, metrics)


def with_bold(summary: pd.DataFrame, final: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``summary`` (rows = arms) with ``<m>_bold``: the column's best arm and every arm the paired t-test over
    seeds does not find worse, Holm-corrected across the table's columns (``stats.bold_cells``), and
    ``<m>_p_holm``, that test's adjusted p-value against the best."""
    runs = final.loc[final.arm.isin(summary.index), ["arm", "seed", *(f"test/{m}" for m in metrics)]]
    long = runs.melt(id_vars=["arm", "seed"], var_name="column").rename(columns={"arm": "row"})
    cells = stats.bold_cells(long)
    out = summary.copy()
    for m in metrics:
        col = cells[cells.index.get_level_values("column") == f"test/{m}"].droplevel("column")
        out[f"{m}_bold"] = col.bold.reindex(out.index).fillna(False).astype(bool)
        out[f"{m}_p_holm"] = col.p_holm.reindex(out.index)
    return out


def matched_seeds(final: pd.DataFrame, order: Sequence[str]) -> tuple[pd.DataFrame, str | None]:
    """The runs of the seeds every arm completed, and a note saying what that leaves out (None: every arm
    has the same seeds). Means over different seeds are not comparable (a study stopped by a timeout with 3
    runs of one arm and 2 of another), nor equal to the paired Δ of the same row; so the tables compare the
    arms on their common seeds. With no seed common to every arm nothing is left out and the note marks the
    incomplete arms: their means are over their own seeds."""
    seeds = {arm: set(final.loc[final.arm == arm, "seed"]) for arm in order}
    if len({frozenset(s) for s in seeds.values()}) <= 1:
        return final, None
    common = set.intersection(*seeds.values())
    every = set.union(*seeds.values())
    incomplete = "; ".join(
        f"{arm} (seeds {', '.join(map(str, sorted(s)))} of {', '.join(map(str, sorted(every)))})"
        for arm, s in seeds.items()
        if s != every
    )
    if not common:
        return final, (
            f"Incomplete arms: {incomplete}. No seed completed in every arm: each arm's mean is over its own "
            "seeds, so the arms' means are not comparable, and no pair is tested"
        )
    kept = final[final.seed.isin(common)]
    return kept, (
        f"Arms compared on their common seeds {', '.join(map(str, sorted(common)))} only (means, Δ and "
        f"paired tests alike; {len(final) - len(kept)} runs of other seeds left out of the tables). "
        f"Incomplete arms: {incomplete}"
    )


def resolve_baseline(requested: str | None, meta: dict[str, Any], arms: Sequence[str]) -> str | None:
    """The baseline arm: ``--baseline`` (a label, or ``factor=value, ...`` in any order), else the study's
    ``baseline:``, else the first arm."""
    if requested is None:
        return meta.get("baseline") or (arms[0] if arms else None)
    want = {p.strip() for p in requested.split(",") if p.strip()}
    hits = [a for a in arms if a == requested or {p.strip() for p in a.split(",")} == want]
    if len(hits) != 1:
        raise HarnessError(f"--baseline {requested!r} matches no arm with results (arms: {'; '.join(arms)})")
    return hits[0]


def ablations(
    summary: pd.DataFrame,
    metrics: list[str],
    meta: dict[str, Any],
    baseline: str,
    final: pd.DataFrame,
) -> dict[str, tuple[pd.DataFrame, dict[str, pd.Series]]]:
    """Per factor: the arms that differ from the baseline in that factor only, with Δ of each metric mean
    and bold decided within that table (``with_bold`` over the ``final`` runs of its arms)."""
    values = {a["label"]: a["display"] for a in meta.get("arms", [])}
    out = {}
    for f in meta.get("factors", []):
        others = [g for g in meta["factors"] if g != f]
        rows = [
            a
            for a in summary.index
            if a in values and all(values[a][g] == values[baseline][g] for g in others)
        ]
        if len(rows) < 2:
            continue
        sub = summary.loc[rows].copy()
        for m in metrics:
            sub[f"{m}_best"] = is_best(sub[f"{m}_mean"])
        sub = with_bold(sub, final, metrics)
        deltas = {
            m: (sub[f"{m}_mean"] - summary.loc[baseline, f"{m}_mean"]).reset_index(drop=True) for m in metrics
        }
        for m in metrics:
            sub[f"{m}_delta"] = deltas[m].to_numpy()
        out[f] = (sub, deltas)
    return out


def tuned_params(df: pd.DataFrame, meta: dict[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """Per arm: the tuned value of each tune param its final runs used (NaN where a ``when`` excluded it),
    the best validation objective of its tune trials and how many of them completed."""
    params = [p for p in meta.get("tune_params", []) if p in df]
    final, tune = final_runs(df), df[(df.stage == "tune") & (df.state == "COMPLETE")]
    out = pd.DataFrame(index=pd.Index(list(order), name="arm"))
    for p in params:
        out[p] = final.groupby("arm")[p].first()
    tuned = tune.groupby("arm")["value"]
    out[f"best val {metric_title(meta.get('metric', 'recall@1'))} (%)"] = (100 * tuned.max()).round(1)
    out["tune trials"] = tuned.size()
    return out.fillna({"tune trials": 0})


def with_significance(sub: pd.DataFrame, sig: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``sub`` (an ablation table) with each arm's paired statistics against the baseline per metric:
    ``<m>_n``, ``<m>_ci_low``/``_ci_high`` (t), ``<m>_p_t``, ``<m>_p_wilcoxon``, ``<m>_distinguishable``."""
    sub = sub.copy()
    for m in metrics:
        for field in ("n", "ci_low", "ci_high", "p_t", "p_wilcoxon", "distinguishable"):
            missing = False if field == "distinguishable" else math.nan  # the baseline's own row
            sub[f"{m}_{field}"] = [
                sig.loc[(a, m), field] if (a, m) in sig.index else missing for a in sub.index
            ]
    return sub


def _significance_columns(show: pd.DataFrame, sub: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The ablation table's CI and p-value columns of the study's metric (the baseline row: —)."""
    bounds = zip(sub[f"{metric}_ci_low"], sub[f"{metric}_ci_high"], strict=True)
    ci = [stats.interval(lo, hi) for lo, hi in bounds]
    p = [
        "—" if math.isnan(t) else f"{stats.format_p(t)} / {stats.format_p(w)}"
        for t, w in zip(sub[f"{metric}_p_t"], sub[f"{metric}_p_wilcoxon"], strict=True)
    ]
    return show.assign(**{f"Δ {metric_title(metric)}, 95% CI": ci, "p (t / Wilcoxon)": p})


def _paper_section(name: str, final: pd.DataFrame, meta: dict[str, Any], tables: Path) -> list[str]:
    """The paper table (published, ours literature, ours fair, differences), written and as report lines."""
    metrics = paper.published_metrics(meta) or table_metrics(final)
    order = _arm_order(meta, [*final.arm.unique(), *(meta.get("published") or {})])
    table = paper.paper_table(final, metrics, order, meta)
    caption = paper.paper_caption(name, meta)
    shown = paper.paper_display(table, arm_titles(meta, order))
    lines = _arm_metric_section(
        "Published vs ours", table, shown, tables / "paper", caption, paper.LEGEND, paper.PAPER_WRAP
    )
    recipe = paper.recipe_table(meta)
    if not recipe.empty:  # under the paper table: what is from the paper, from the official code, ours
        caption = paper.recipe_caption(name)
        write_table(recipe, recipe, tables / "recipe", caption, wrap=paper.RECIPE_WRAP)
        lines += ["", "### Recipe", "", caption + ".", "", to_markdown(recipe)]
    return lines


def _arm_metric_section(
    title: str,
    numeric: pd.DataFrame,
    shown: pd.DataFrame,
    stem: Path,
    caption: str,
    legend_text: str = "",
    wrap: dict[str, str] | None = None,
) -> list[str]:
    """A table with two label columns (arm and metric or source) under ``caption``: ``numeric`` as CSV,
    ``shown`` as Markdown and LaTeX (``write_table``) and as report lines, the legend under it."""
    write_table(numeric, shown, stem, caption, legend_text, n_labels=2, wrap=wrap)
    return [f"## {title}", "", caption + ".", "", to_markdown(shown), *([legend_text] if legend_text else [])]


def _write_pages(name: str, lines: list[str], folder: Path, final: pd.DataFrame, order: list[str]) -> None:
    """report.md and the self-contained report.html (with the resolved config of each arm's first run)."""
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    configs = {}
    for arm in order:
        dirs = final[final.arm == arm].sort_values("seed").run_dir.dropna()
        path = next((Path(d) / "config.yaml" for d in dirs if (Path(d) / "config.yaml").is_file()), None)
        if path is not None:
            configs[arm] = yaml.safe_load(path.read_text())
    page.write_html(f"Study {name}", lines, folder, configs)


def write_report(
    name: str, storage: str | None = None, results: str | Path = "results", baseline: str | None = None
) -> Path:
    """Write tables/, plots/, report.md and report.html of study ``name``; return the study folder."""
    df = store.load(name, storage, results)
    meta, folder = df.attrs["meta"], Path(df.attrs["folder"])
    tables, figures_dir = folder / "tables", folder / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    final = final_runs(df)
    lines = _intro(name, meta, final)
    top = len(lines)  # where the caveats go, once the numbers they are about are known
    if final.empty:
        lines.append("No final run has completed yet; run `dmlh report` again later.")
        lines += ["", *(f"Note: {n}." for n in unfinished_arms(df, meta))]
        _write_pages(name, lines, folder, final, [])
        return folder
    lines += search.flag_lines(final)
    if paper.is_paper_study(final, meta):
        lines += _paper_section(name, final, meta, tables)
    by_protocol = paper.split_by_protocol(final)
    final = by_protocol.get("fair", by_protocol.get("literature", final))
    metrics = table_metrics(final)
    matched, unmatched = matched_seeds(final, _arm_order(meta, list(final.arm.unique())))
    summary = summarize(matched, metrics, meta)
    order = list(summary.index)
    titles = arm_titles(meta, order)
    notes = [*(meta.get("notes") or []), *([unmatched] if unmatched else []), *unfinished_arms(df, meta)]
    lines += _comparison_section(name, summary, metrics, len(by_protocol) > 1, tables, notes, titles)
    lines += _learners_section(name, final, order, tables, titles)
    base = resolve_baseline(baseline, meta, order)
    if base is not None and base in summary.index:
        lines += _baseline_sections(name, matched, summary, metrics, meta, base, tables, titles)
        lines += _effects_sections(name, matched, metrics, meta, base, tables)
    if meta.get("tune_params"):
        lines += _tuned_section(name, df, meta, order, tables, titles)
    saved = pictures.saved_runs(final, order)
    lines += _bootstrap_section(name, saved, order, metrics, tables, titles)
    _, _, opened = store.resolve(name, storage, results)
    imp = plots.param_importances(name, opened)
    found = caveats.caveats(df, matched, meta.get("metric", "recall@1"), imp)
    for caveat in found:
        log.warning("study %s: %s", name, caveat)
    lines[top:top] = caveats.caveat_lines(found)
    drawn = _draw(final, meta, order, base, saved, imp, tables, figures_dir)
    budget = search.trials_per_arm(df, order)
    budget.to_csv(tables / "trials_per_arm.csv")
    lines += ["## Trials per arm", "", to_markdown(budget.reset_index()), ""]
    if any(title in budget for title in search.EPOCH_TIMES.values()):
        lines += [search.TIMES_NOTE, ""]
    lines += ["## Figures", ""]
    for png in (p for p in drawn if p.suffix == ".png"):
        title, caption = plots.figure_caption(png.stem, meta)
        lines += [f"![{title}](plots/{png.name})", f"*{caption}*", ""]
    _write_pages(name, lines, folder, final, order)
    log.info("report of %s: %s", name, folder / "report.html")
    log.info("tables (CSV, Markdown, LaTeX): %s (%d)", tables, len(list(tables.glob("*.csv"))))
    log.info("figures (PNG, SVG, PDF): %s (%d)", figures_dir, len(list(figures_dir.glob("*.png"))))
    return folder


def _intro(name: str, meta: dict[str, Any], final: pd.DataFrame) -> list[str]:
    """The title, the study's question, what the numbers are (seeds, selection, tuning) and the search."""
    seeds = meta.get("seeds", [])
    n_protocols = max(1, len(paper.split_by_protocol(final)))
    expected = len(meta.get("arms", [])) * len(seeds) * n_protocols
    tuned = f", and each arm's hyperparameters tuned on them ({meta['n_trials']} trials per arm)"
    literature = (
        "Literature-protocol runs (the paper table only) trained on every training class with the "
        "paper's fixed recipe, untuned. "
    )
    only_literature = not final.empty and bool((paper.protocols(final) == "literature").all())
    lines = [f"# Study `{name}`", ""]
    if meta.get("factors"):
        factors = ", ".join(f"`{f}`" for f in meta["factors"])
        metric = metric_title(meta.get("metric", "recall@1"))
        lines += [
            f"Question: how {'does' if len(meta['factors']) == 1 else 'do'} {factors} change test {metric}, "
            "and is each difference larger than seed noise?",
            "",
        ]
    lines += [
        f"Test-split metrics of the final stage: mean ± sample std over seeds {seeds}, in %. "
        "Epochs were selected on validation classes"
        + (tuned if meta.get("n_trials") else "")
        + "; nothing was selected on test classes. "
        + (literature if n_protocols > 1 or only_literature else "")
        + f"{len(final)} of {expected} final runs complete.",
        "",
        search.search_line(meta),
        "",
    ]
    return lines


def unfinished_arms(df: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """A line for each arm of the study without a finished final run of the protocol the comparison shows
    (fair, else literature), which the tables therefore leave out: how many of its runs failed and the first
    reason, or that none has finished yet."""
    arms = [a["label"] for a in meta.get("arms", [])]
    if df.empty:
        return [f"arm {arm}: no finished final run yet" for arm in arms]
    protocol = "literature" if meta.get("protocol") == "literature" else "fair"
    runs = df[(df.stage == "final") & (paper.protocols(df) == protocol)]
    lines = []
    for arm in arms:
        mine = runs[runs.arm == arm]
        if (mine.state == "COMPLETE").any():
            continue
        failed = mine[(mine.state == "FAIL") & ~mine.lost.astype(bool)].sort_values("number")
        if failed.empty:
            lines.append(f"arm {arm}: no finished final run yet")
            continue
        first = textwrap.shorten(str(failed.reason.iloc[0] or "no reason recorded"), 200, placeholder=" …")
        lines.append(f"arm {arm}: no finished final run ({len(failed)} failed: {first})")
    return lines


def _comparison_section(
    name: str,
    summary: pd.DataFrame,
    metrics: list[str],
    both_protocols: bool,
    tables: Path,
    notes: list[str],
    titles: dict[str, str],
) -> list[str]:
    """The comparison table: every arm (by its title), every test metric, bold where the data supports it
    (``with_bold``) and the legend under it; the study's ``notes`` (what its arms differ in beyond their
    factors) in its caption and under it."""
    caption = f"{name}: test metrics (%), mean ± std over seeds"
    if both_protocols:
        caption += " (fair protocol; the literature protocol's runs are in the paper table)"
    caption += "".join(f". {n}" for n in notes)
    md = display(summary, metrics, titles=titles)
    write_table(summary, md, tables / "comparison", caption, legend())
    return [
        "## Comparison",
        "",
        to_markdown(md),
        legend(),
        *(["", *(f"Note: {n}." for n in notes)] if notes else []),
    ]


def _learners_section(
    name: str, final: pd.DataFrame, order: list[str], tables: Path, titles: dict[str, str]
) -> list[str]:
    """Each learner of an ensemble alone beside the ensemble (the ABE paper's table); nothing when no arm's
    runs scored learners."""
    summary = learners.learner_summary(final, order)
    if summary.empty:
        return []
    cap = (
        f"{name}: test metrics (%) of each learner's own embedding (its columns of the ensemble's) and of "
        "the ensemble, mean ± std over seeds; blank: the arm has fewer learners"
    )
    shown = learners.learner_display(summary, titles)
    return _arm_metric_section("Per-learner Recall@K", summary, shown, tables / "learners", cap)


def _baseline_sections(
    name: str,
    final: pd.DataFrame,
    summary: pd.DataFrame,
    metrics: list[str],
    meta: dict[str, Any],
    base: str,
    tables: Path,
    titles: dict[str, str],
) -> list[str]:
    """One ablation table per factor (the arms that differ from the baseline in it only) and the paired
    significance of every arm against the baseline."""
    sig = stats.significance(final, metrics, base, order=list(summary.index))
    caveat = stats.caveat(int(sig.n.min()) if len(sig) else 0)
    metric = meta.get("metric", "recall@1")
    objective = metric if metric in metrics else metrics[0]
    lines, base_title = [], titles.get(base, base)
    for f, (sub, deltas) in ablations(summary, metrics, meta, base, final).items():
        sub = with_significance(sub, sig, metrics)
        cap = (
            f"{name}: ablation of {f} against the baseline arm '{base_title}' (Δ in points; * paired t-test "
            f"p < {stats.ALPHA} over matched seeds, unmarked: not distinguishable from seed noise)"
        )
        md = _significance_columns(display(sub, metrics, deltas, (f,), baseline=base), sub, objective)
        write_table(sub, md, tables / f"ablation_{plots.slug(f)}", cap, legend(delta=True))
        lines += [
            f"## Ablation: {f}",
            "",
            f"Baseline: `{base}`; (Δ) in points against it; * marks a paired t-test p < {stats.ALPHA} "
            f"over matched seeds. {caveat}",
            "",
            to_markdown(md),
            legend(delta=True),
        ]
    if len(sig):
        cap = (
            f"{name}: each arm minus the baseline '{base_title}', paired over matched seeds (Δ and "
            f"95% CIs in points). {caveat}"
        )
        md = stats.significance_display(sig, titles)
        write_table(sig, md, tables / "significance", cap, n_labels=2)
        lines += ["## Significance against the baseline", "", cap, "", to_markdown(md)]
    return lines


def _effects_sections(
    name: str, final: pd.DataFrame, metrics: list[str], meta: dict[str, Any], base: str, tables: Path
) -> list[str]:
    """A factorial study's simple effects (each factor at every level of the others) and the interaction of
    every pair of factors, of the study's metric (``harness.reporting.effects``)."""
    metric = meta.get("metric", "recall@1")
    metric = metric if metric in metrics else metrics[0]
    title, lines = metric_title(metric), []
    parts = (
        (
            "Effects at every level of the other factors",
            effects.simple_effects(final, metric, meta, base),
            "effects",
            f"{name}: Δ {title} (points) of changing one factor from the baseline's level, at every "
            "combination of the other factors' levels, paired over the seeds both arms completed",
        ),
        (
            "Interactions",
            effects.interactions(final, metric, meta, base),
            "interactions",
            f"{name}: interaction of each pair of factors, Δ {title} (points) = (y[a', b'] − y[a, b']) − "
            "(y[a', b] − y[a, b]) with a, b the baseline's levels: how much one factor's effect changes with "
            "the other's level (0: the effects add up), paired over the seeds the four arms completed",
        ),
    )
    for title_, table, stem, cap in parts:
        if table.empty:
            continue
        md = effects.effects_display(table)
        write_table(table, md, tables / stem, cap, n_labels=3)
        lines += [f"## {title_}", "", cap + ".", "", to_markdown(md)]
    return lines


def _tuned_section(
    name: str, df: pd.DataFrame, meta: dict[str, Any], order: list[str], tables: Path, titles: dict[str, str]
) -> list[str]:
    """The hyperparameters each arm's final runs used, as tuned on validation classes."""
    tuned = tuned_params(df, meta, order)
    cap = f"{name}: hyperparameters tuned per arm on validation classes, as the final runs used them"
    shown = (
        tuned.rename(index=titles)
        .reset_index()
        .map(lambda v: "—" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else v)
    )
    write_table(tuned, shown, tables / "tuned", cap)
    return ["## Tuned hyperparameters", "", cap + ".", "", to_markdown(shown)]


def _bootstrap_section(
    name: str,
    saved: dict[str, Any],
    order: list[str],
    metrics: list[str],
    tables: Path,
    titles: dict[str, str],
) -> list[str]:
    """Recall@K of one run per arm with a bootstrap CI over its test queries (nothing without saved runs)."""
    boot = pictures.query_bootstrap(saved, order, pictures.recall_ks(metrics))
    if boot.empty:
        return []
    cap = (
        f"{name}: Recall@K of each arm's lowest-seed run with a 95% bootstrap CI over its test queries "
        "(the uncertainty from the finite query set of one run, not seed noise)"
    )
    numeric = boot.set_index(["arm", "metric"])
    shown = pictures.query_bootstrap_display(boot.assign(arm=boot.arm.map(lambda a: titles.get(a, a))), False)
    stem = tables / "query_bootstrap"
    return _arm_metric_section("One run, bootstrap over queries", numeric, shown, stem, cap)


def _draw(
    final: pd.DataFrame,
    meta: dict[str, Any],
    order: list[str],
    base: str | None,
    saved: dict[str, Any],
    imp: pd.DataFrame,
    tables: Path,
    folder: Path,
) -> list[Path]:
    """Every plot of the report (PNG, SVG and/or PDF each), in the order the report shows them, in the arms'
    colours (``figures.arm_palette``); ``imp``: the tune stages' parameter importances."""
    metric = meta.get("metric", "recall@1")
    with pictures.paper_style():
        drawn = plots.plot_per_arm(final, metric, order, folder / f"{plots.slug(metric)}_per_arm")
        drawn += plots.plot_vs_factors(final, metric, meta, folder)
        drawn += plots.plot_heatmaps(final, metric, meta, folder)
        hist = plots.histories(final)
        drawn += plots.plot_learning_curves(hist, metric, order, folder / "learning_curves")
        drawn += plots.plot_diagnostics(hist, order, folder / "diagnostics")
        if not imp.empty:
            imp.to_csv(tables / "param_importances.csv", index=False)
        drawn += plots.plot_importances(imp, order, folder / "param_importances")
        drawn += pictures.plot_retrieval_grids(saved, order, base, folder)
        drawn += pictures.plot_embedding_maps(saved, order, folder)
        for plot in method_diagnostics.PLOTS:
            drawn += plot(final, order, folder)
    return drawn
