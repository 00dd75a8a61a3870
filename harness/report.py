"""Comparison tables and plots of a study, from the results store only (any time, also mid-study).

Every number in a table is the mean ± sample std (ddof=1) over the final stage's seeds of a test-split
metric; nothing in a table was selected on test classes. Writes ``results/<study>/tables/`` (Markdown,
CSV with numeric mean/std/best columns, LaTeX), ``results/<study>/plots/`` (PNG and SVG) and a
``report.md`` that shows them together.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness import store  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.reporting import diagnostics as method_diagnostics  # noqa: E402
from harness.reporting import figures as pictures  # noqa: E402
from harness.reporting import page, paper, search, stats  # noqa: E402
from harness.types import TABLE_METRICS, metric_title, recall_k  # noqa: E402

log = logging.getLogger(__name__)

#: Columns of history.csv that are not method diagnostics.
STANDARD_HISTORY = ("epoch", "lr", "seconds", "train/loss", "train_s", "eval_s", "images_per_s")


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


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
    (over seeds, ddof=1) and ``<m>_best`` (the highest mean of the column)."""
    factors = [f for f in meta.get("factors", []) if f in final]
    grouped = final.groupby("arm", sort=False)
    out = pd.DataFrame(index=pd.Index(_arm_order(meta, list(grouped.groups)), name="arm"))
    for f in factors:
        out[f] = grouped[f].first()
    out["runs"] = grouped.size()
    for m in metrics:
        stats = grouped[f"test/{m}"].agg(["mean", "std"])
        out[f"{m}_mean"] = stats["mean"]
        out[f"{m}_std"] = stats["std"]
        out[f"{m}_best"] = _is_best(out[f"{m}_mean"])
    return out


def _is_best(means: pd.Series) -> pd.Series:
    """The highest mean of a column, ties (up to float rounding) included."""
    return pd.Series(np.isclose(means, means.max(), rtol=0, atol=1e-12), index=means.index)


def _pm(mean: float, std: float, tex: bool = False) -> str:
    pm = " $\\pm$ " if tex else " ± "
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f"{pm}{100 * std:.1f}")


def _bold(text: str, tex: bool) -> str:
    return f"\\textbf{{{text}}}" if tex else f"**{text}**"


_TEX_SPECIAL = re.compile(r"([&%$#_{}])")


def _tex_escape(text: str) -> str:
    return _TEX_SPECIAL.sub(r"\\\1", text)


def _display(
    summary: pd.DataFrame,
    metrics: list[str],
    tex: bool,
    deltas: dict[str, pd.Series] | None = None,
    label_columns: Sequence[str] = ("arm",),
) -> pd.DataFrame:
    """The human-readable table: metric cells ``mean ± std`` (in %), the best mean of each column in bold,
    ``(+Δ)`` against the baseline when ``deltas`` is given (``(+Δ*)`` where ``<m>_distinguishable``)."""
    esc = _tex_escape if tex else str
    rows = summary.reset_index()
    show = pd.DataFrame({c: rows[c].map(lambda v: esc(str(v))) for c in label_columns})
    show["runs"] = rows["runs"].astype(int)
    for m in metrics:
        cells = []
        for i, r in rows.iterrows():
            cell = _pm(r[f"{m}_mean"], r[f"{m}_std"], tex)
            if deltas is not None:
                mark = "*" if r.get(f"{m}_distinguishable") is True else ""
                cell += f" ({100 * deltas[m].iloc[i]:+.1f}{mark})"
            cells.append(_bold(cell, tex) if r[f"{m}_best"] else cell)
        show[esc(metric_title(m)) + (" (%)" if not tex else " (\\%)")] = cells
    return show


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, align, *body]) + "\n"


_TEX_SYMBOLS = {"±": "$\\pm$", "Δ": "$\\Delta$", "≥": "$\\geq$", "<": "$<$"}


def _tex_caption(text: str) -> str:
    """A caption for LaTeX: special characters escaped, the symbols the captions use in math mode."""
    return re.sub("|".join(_TEX_SYMBOLS), lambda m: _TEX_SYMBOLS[m.group()], _tex_escape(text))


def _write_table(
    numeric: pd.DataFrame, md: pd.DataFrame, tex: pd.DataFrame, stem: Path, caption: str, n_labels: int = 1
) -> None:
    """CSV (numeric), Markdown and LaTeX (booktabs) versions of one table."""
    numeric.to_csv(stem.with_suffix(".csv"))
    stem.with_suffix(".md").write_text(f"{caption}\n\n{to_markdown(md)}")
    align = "l" * n_labels + "r" * (len(tex.columns) - n_labels)
    latex = tex.to_latex(
        index=False,
        escape=False,
        caption=_tex_caption(caption),
        label=f"tab:{stem.name}",
        column_format=align,
    )
    stem.with_suffix(".tex").write_text(latex)


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
) -> dict[str, tuple[pd.DataFrame, dict[str, pd.Series]]]:
    """Per factor: the arms that differ from the baseline in that factor only, with Δ of each metric mean."""
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
            sub[f"{m}_best"] = _is_best(sub[f"{m}_mean"])
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


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


_save = pictures.save_figure


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def _factor_kind(meta: dict[str, Any], factor: str) -> str:
    """``numeric`` (numbers), ``length`` (lists: numeric by length, e.g. MDR levels) or ``categorical``."""
    vals = [a["values"][factor] for a in meta.get("arms", [])]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return "numeric"
    if all(isinstance(v, list) for v in vals):
        return "length"
    return "categorical"


def _percent(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """A copy of ``df`` with metric column ``col`` in % (the unit of the tables)."""
    return df.assign(**{col: 100 * df[col]})


def plot_per_arm(final: pd.DataFrame, metric: str, order: list[str], stem: Path) -> list[Path]:
    """The objective per arm: mean with a 95% bootstrap CI over seeds, and every seed as a dot."""
    col = f"test/{metric}"
    data = _percent(final, col)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(order) + 1.5))
    palette = pictures.arm_palette(order)
    sns.barplot(
        data=data,
        x=col,
        y="arm",
        hue="arm",
        order=order,
        palette=palette,
        errorbar=("ci", 95),
        alpha=0.5,
        legend=False,
        ax=ax,
    )
    sns.stripplot(
        data=data,
        x=col,
        y="arm",
        hue="arm",
        order=order,
        palette=palette,
        size=5,
        edgecolor="black",
        linewidth=0.5,
        legend=False,
        ax=ax,
    )
    ax.set(
        xlabel=f"test {metric_title(metric)} (%); bar: mean, line: 95% bootstrap CI over seeds, dots: seeds",
        ylabel="",
    )
    return _save(fig, stem)


def plot_vs_factors(final: pd.DataFrame, metric: str, meta: dict[str, Any], folder: Path) -> list[Path]:
    """The objective against each numeric factor (a list-valued factor by its length), one line per setting of
    the other factors."""
    paths = []
    values = {a["label"]: a["values"] for a in meta.get("arms", [])}
    col = f"test/{metric}"
    for f in meta.get("factors", []):
        kind = _factor_kind(meta, f)
        if kind == "categorical":
            continue
        data = _percent(final, col)
        x = f"number of {f}" if kind == "length" else f
        data[x] = [len(values[a][f]) if kind == "length" else values[a][f] for a in data.arm]
        others = [g for g in meta["factors"] if g != f]
        hue = None
        if others:
            hue = ", ".join(others)
            data[hue] = data[others].astype(str).agg(", ".join, axis=1)
        fig, ax = plt.subplots(figsize=(6, 4))
        sns.lineplot(data=data, x=x, y=col, hue=hue, marker="o", errorbar=("ci", 95), ax=ax)
        ax.set(ylabel=f"test {metric_title(metric)} (%)")
        xs = sorted(set(data[x]))
        if xs[0] > 0 and xs[-1] >= 4 * xs[0] and all(math.log2(v).is_integer() for v in xs):  # M = 1, 2, 4, 8
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
        paths += _save(fig, folder / f"{_slug(metric)}_vs_{_slug(f)}")
    return paths


def plot_heatmaps(final: pd.DataFrame, metric: str, meta: dict[str, Any], folder: Path) -> list[Path]:
    """Mean objective for every pair of factors, e.g. loss × synthesis or M × λ_div (averaged over the other
    factors and the seeds); rows and columns in the study's order."""
    levels = {
        f: list(dict.fromkeys(a["display"][f] for a in meta.get("arms", []))) for f in meta.get("factors", [])
    }
    paths = []
    for a, b in combinations(levels, 2):
        grid = final.pivot_table(index=a, columns=b, values=f"test/{metric}", aggfunc="mean")
        grid = grid.reindex(
            index=[v for v in levels[a] if v in grid.index],
            columns=[v for v in levels[b] if v in grid.columns],
        )
        fig, ax = plt.subplots(figsize=(1.4 * len(grid.columns) + 3, 0.6 * len(grid) + 2))
        sns.heatmap(
            grid * 100,
            annot=True,
            fmt=".1f",
            cmap="viridis",
            ax=ax,
            cbar_kws={"label": f"test {metric_title(metric)} (%)"},
        )
        paths += _save(fig, folder / f"heatmap_{_slug(a)}_x_{_slug(b)}")
    return paths


def histories(final: pd.DataFrame) -> pd.DataFrame:
    """All per-epoch history rows of the final runs whose folders are on this machine (with arm and seed)."""
    frames = []
    for r in final.itertuples():
        h = store.read_history(r.run_dir) if r.run_dir else None
        if h is not None:
            frames.append(h.assign(arm=r.arm, seed=r.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_learning_curves(hist: pd.DataFrame, metric: str, order: list[str], stem: Path) -> list[Path]:
    col = f"val/{metric}"
    if hist.empty or col not in hist:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(
        data=_percent(hist.dropna(subset=[col]), col),
        x="epoch",
        y=col,
        hue="arm",
        hue_order=order,
        palette=pictures.arm_palette(order),
        marker="o",
        errorbar=("ci", 95),
        ax=ax,
    )
    ax.set(ylabel=f"validation {metric_title(metric)} (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize="small", title="arm")
    return _save(fig, stem)


def plot_diagnostics(hist: pd.DataFrame, order: list[str], stem: Path, max_panels: int = 12) -> list[Path]:
    """Method diagnostics over epochs: scalar history columns other than the standard ones (diag/… first)."""
    if hist.empty:
        return []
    cols = [
        c
        for c in hist.columns
        if c not in (*STANDARD_HISTORY, "arm", "seed")
        and not c.startswith(("val/", "test_epoch/", "train/embed/"))
        and pd.api.types.is_numeric_dtype(hist[c])
        and hist[c].notna().any()
    ]
    cols = sorted(cols, key=lambda c: (not c.startswith("diag/"), c))[:max_panels]
    if not cols:
        return []
    long = hist.melt(id_vars=["arm", "seed", "epoch"], value_vars=cols, var_name="diagnostic").dropna()
    grid = sns.relplot(
        data=long,
        x="epoch",
        y="value",
        hue="arm",
        hue_order=[a for a in order if a in set(long.arm)],
        palette=pictures.arm_palette(order),
        col="diagnostic",
        col_wrap=min(3, len(cols)),
        kind="line",
        errorbar=("ci", 95),
        facet_kws={"sharey": False},
        height=2.6,
        aspect=1.3,
    )
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(grid.figure, stem)


def param_importances(name: str, storage: optuna.storages.BaseStorage) -> pd.DataFrame:
    """Optuna's parameter importances of each arm's tune stage (arms with >= 2 complete trials and varied
    params; the others are skipped)."""
    rows = []
    for sname in store.study_names(storage, name)[1:]:
        study = optuna.load_study(study_name=sname, storage=storage)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        varied = {p for t in done for p in t.params if len({str(u.params.get(p)) for u in done}) > 1}
        if len(done) < 2 or not varied:
            continue
        try:
            imp = optuna.importance.get_param_importances(study, params=sorted(varied))
        except (ValueError, RuntimeError) as e:
            log.info("no parameter importances for %s: %s", sname, e)
            continue
        arm = sname.removeprefix(name + store.TUNE_INFIX)
        rows += [{"arm": arm, "param": p, "importance": v} for p, v in imp.items()]
    return pd.DataFrame(rows)


def plot_importances(imp: pd.DataFrame, stem: Path) -> list[Path]:
    if imp.empty:
        return []
    fig, ax = plt.subplots(figsize=(7, 0.4 * imp.param.nunique() * max(1, imp.arm.nunique() // 2) + 2))
    sns.barplot(data=imp, x="importance", y="param", hue="arm", ax=ax)
    ax.set(title="Optuna parameter importances of the tune stage (per arm)", ylabel="")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize="small", title="arm")
    return _save(fig, stem)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


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


def _significance_columns(show: pd.DataFrame, sub: pd.DataFrame, metric: str, tex: bool) -> pd.DataFrame:
    """The ablation table's CI and p-value columns of the study's metric (the baseline row: —)."""
    na = "--" if tex else "—"
    title = metric_title(metric)
    ci = [
        na if math.isnan(lo) else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
        for lo, hi in zip(sub[f"{metric}_ci_low"], sub[f"{metric}_ci_high"], strict=True)
    ]
    p = [
        na if math.isnan(t) else f"{stats.format_p(t, na)} / {stats.format_p(w, na)}"
        for t, w in zip(sub[f"{metric}_p_t"], sub[f"{metric}_p_wilcoxon"], strict=True)
    ]
    head = f"$\\Delta$ {title}, 95\\% CI" if tex else f"Δ {title}, 95% CI"
    return show.assign(**{head: ci, "p (t / Wilcoxon)": p})


def _paper_section(name: str, final: pd.DataFrame, meta: dict[str, Any], tables: Path) -> list[str]:
    """The paper table (published, ours literature, ours fair, differences), written and as report lines."""
    metrics = paper.published_metrics(meta) or table_metrics(final)
    order = _arm_order(meta, [*final.arm.unique(), *(meta.get("published") or {})])
    table = paper.paper_table(final, metrics, order, meta)
    caption = paper.paper_caption(name, meta)
    md = paper.paper_display(table, tex=False)
    tex = paper.paper_display(table, tex=True, escape=_tex_escape)
    _write_table(table, md, tex, tables / "paper", caption, n_labels=2)
    return ["## Published vs ours", "", caption + ".", "", to_markdown(md)]


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
    """Write tables/, plots/ and report.md of study ``name``; return the study folder."""
    df = store.load(name, storage, results)
    meta, folder = df.attrs["meta"], Path(df.attrs["folder"])
    tables, plots = folder / "tables", folder / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    final = final_runs(df)
    metric = meta.get("metric", "recall@1")
    seeds = meta.get("seeds", [])
    n_protocols = max(1, len(paper.split_by_protocol(final)))
    expected = len(meta.get("arms", [])) * len(seeds) * n_protocols
    lines = [
        f"# Study `{name}`",
        "",
        f"Test-split metrics of the final stage: mean ± sample std over seeds {seeds}, in %. "
        "Epochs were selected on validation classes"
        + (
            f", and each arm's hyperparameters tuned on them ({meta['n_trials']} trials per arm)"
            if meta.get("n_trials")
            else ""
        )
        + "; nothing was selected on test classes. "
        + (
            "Literature-protocol runs (the paper table only) trained on every training class with the "
            "paper's fixed recipe, untuned. "
            if n_protocols > 1 or not final.empty and (paper.protocols(final) == "literature").all()
            else ""
        )
        + f"{len(final)} of {expected} final runs complete.",
        "",
    ]
    if meta.get("factors"):
        lines[1:1] = [
            "",
            f"Question: how do {', '.join(f'`{f}`' for f in meta['factors'])} change test "
            f"{metric_title(metric)}, and is each difference larger than seed noise?",
        ]
    lines += [search.search_line(meta), ""]
    if final.empty:
        lines.append("No final run has completed yet; run `dmlh report` again later.")
        _write_pages(name, lines, folder, final, [])
        return folder
    lines += search.collapse_lines(final)
    if paper.is_paper_study(final, meta):
        lines += _paper_section(name, final, meta, tables)
    by_protocol = paper.split_by_protocol(final)
    final = by_protocol.get("fair", by_protocol.get("literature", final))
    metrics = table_metrics(final)
    summary = summarize(final, metrics, meta)
    order = list(summary.index)
    caption = f"{name}: test metrics (%), mean ± std over seeds; best mean per column in bold"
    if len(by_protocol) > 1:
        caption += " (fair protocol; the literature protocol's runs are in the paper table)"
    _write_table(
        summary,
        _display(summary, metrics, False),
        _display(summary, metrics, True),
        tables / "comparison",
        caption,
    )
    lines += ["## Comparison", "", to_markdown(_display(summary, metrics, False))]
    base = resolve_baseline(baseline, meta, order)
    if base is not None and base in summary.index:
        sig = stats.significance(final, metrics, base, order)
        caveat = stats.caveat(int(sig.n.min()) if len(sig) else 0)
        objective = metric if metric in metrics else metrics[0]
        for f, (sub, deltas) in ablations(summary, metrics, meta, base).items():
            sub = with_significance(sub, sig, metrics)
            cap = (
                f"{name}: ablation of {f} against the baseline arm '{base}' (Δ in points; * paired t-test "
                f"p < {stats.ALPHA} over matched seeds, unmarked: not distinguishable from seed noise)"
            )
            md = _significance_columns(_display(sub, metrics, False, deltas, (f,)), sub, objective, False)
            tex = _significance_columns(_display(sub, metrics, True, deltas, (f,)), sub, objective, True)
            _write_table(sub, md, tex, tables / f"ablation_{_slug(f)}", cap)
            lines += [
                f"## Ablation: {f}",
                "",
                f"Baseline: `{base}`; (Δ) in points against it; * marks a paired t-test p < {stats.ALPHA} "
                f"over matched seeds. {caveat}",
                "",
                to_markdown(md),
            ]
        if len(sig):
            cap = (
                f"{name}: each arm minus the baseline '{base}', paired over matched seeds (Δ and 95% CIs in "
                f"points). {caveat}"
            )
            md = stats.significance_display(sig, False)
            tex = stats.significance_display(sig, True, _tex_escape)
            _write_table(sig, md, tex, tables / "significance", cap, n_labels=2)
            lines += ["## Significance against the baseline", "", cap, "", to_markdown(md)]
    if meta.get("tune_params"):
        tuned = tuned_params(df, meta, order)
        cap = f"{name}: hyperparameters tuned per arm on validation classes, as the final runs used them"
        shown = tuned.reset_index().map(
            lambda v: "—" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else v
        )
        tex = shown.map(lambda v: _tex_escape(str(v))).rename(columns=_tex_escape)
        _write_table(tuned, shown, tex, tables / "tuned", cap)
        lines += ["## Tuned hyperparameters", "", cap + ".", "", to_markdown(shown)]
    saved = pictures.saved_runs(final, order)
    boot = pictures.query_bootstrap(saved, order, pictures.recall_ks(metrics))
    if not boot.empty:
        cap = (
            f"{name}: Recall@K of each arm's lowest-seed run with a 95% bootstrap CI over its test queries "
            "(the uncertainty from the finite query set of one run, not seed noise)"
        )
        shown = pictures.query_bootstrap_display(boot, False)
        _write_table(
            boot.set_index(["arm", "metric"]),
            shown,
            pictures.query_bootstrap_display(boot, True, _tex_escape),
            tables / "query_bootstrap",
            cap,
            n_labels=2,
        )
        lines += ["## One run, bootstrap over queries", "", cap + ".", "", to_markdown(shown)]
    _, _, opened = store.resolve(name, storage, results)
    with pictures.paper_style():
        figures = plot_per_arm(final, metric, order, plots / f"{_slug(metric)}_per_arm")
        figures += plot_vs_factors(final, metric, meta, plots)
        figures += plot_heatmaps(final, metric, meta, plots)
        hist = histories(final)
        figures += plot_learning_curves(hist, metric, order, plots / "learning_curves")
        figures += plot_diagnostics(hist, order, plots / "diagnostics")
        imp = param_importances(name, opened)
        if not imp.empty:
            imp.to_csv(tables / "param_importances.csv", index=False)
        figures += plot_importances(imp, plots / "param_importances")
        figures += pictures.plot_retrieval_grids(saved, order, base, plots)
        figures += pictures.plot_embedding_maps(saved, order, plots)
        for plot in method_diagnostics.PLOTS:
            figures += plot(final, order, plots)
    budget = search.trials_per_arm(df, order)
    budget.to_csv(tables / "trials_per_arm.csv")
    lines += ["## Trials per arm", "", to_markdown(budget.reset_index()), ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in figures if p.suffix == ".png"]
    _write_pages(name, lines, folder, final, order)
    log.info("report of %s: %d tables, %d plots", name, len(list(tables.glob("*.csv"))), len(figures) // 3)
    return folder
