"""The study plots of a report drawn from the final runs and their histories: the objective per arm, against
numeric factors and per pair of factors, learning curves, method diagnostics over epochs and Optuna's
parameter importances. Every plot uses the study's arm colours (``figures.arm_palette``)."""

from __future__ import annotations

import logging
import math
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness import store  # noqa: E402
from harness.reporting import figures as pictures  # noqa: E402
from harness.types import metric_title  # noqa: E402

log = logging.getLogger(__name__)

#: Columns of history.csv that are not method diagnostics.
STANDARD_HISTORY = ("epoch", "lr", "seconds", "train/loss", "train_s", "eval_s", "images_per_s", "mining_s")


_save = pictures.save_figure


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def factor_kind(meta: dict[str, Any], factor: str) -> str:
    """``numeric`` (numbers), ``length`` (lists: numeric by length, e.g. MDR levels) or ``categorical``."""
    vals = [a["values"][factor] for a in meta.get("arms", [])]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return "numeric"
    if all(isinstance(v, list) for v in vals):
        return "length"
    return "categorical"


def percent(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """A copy of ``df`` with metric column ``col`` in % (the unit of the tables)."""
    return df.assign(**{col: 100 * df[col]})


def plot_per_arm(final: pd.DataFrame, metric: str, order: list[str], stem: Path) -> list[Path]:
    """The objective per arm: mean with a 95% bootstrap CI over seeds, and every seed as a dot."""
    col = f"test/{metric}"
    data = percent(final, col)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(order) + 1.5))
    palette = pictures.arm_palette(order)
    same = {"data": data, "x": col, "y": "arm", "hue": "arm", "order": order, "palette": palette}
    sns.barplot(**same, errorbar=("ci", 95), alpha=0.5, legend=False, ax=ax)
    sns.stripplot(**same, size=5, edgecolor="black", linewidth=0.5, legend=False, ax=ax)
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
        kind = factor_kind(meta, f)
        if kind == "categorical":
            continue
        data = percent(final, col)
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
        paths += _save(fig, folder / f"{slug(metric)}_vs_{slug(f)}")
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
        paths += _save(fig, folder / f"heatmap_{slug(a)}_x_{slug(b)}")
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
        data=percent(hist.dropna(subset=[col]), col),
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
