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
    sns.barplot(**same, errorbar=("ci", 95), alpha=0.5, saturation=1, legend=False, ax=ax)  # arm colours
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
    _epoch_axis(ax, hist.epoch)
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
        marker="o",  # a one-epoch run is a point
        facet_kws={"sharey": False},
        height=2.6,
        aspect=1.3,
    )
    for column, ax in grid.axes_dict.items():
        title, unit = history_label(column)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit)
        _epoch_axis(ax, long.epoch)
    return _save(grid.figure, stem)


def _epoch_axis(ax: Any, epochs: pd.Series) -> None:
    """Ticks at the epochs drawn (up to 12 of them), else at integers only."""
    ticks = sorted(epochs.dropna().unique())
    if len(ticks) <= 12:
        ax.set_xticks(ticks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


#: Who recorded a history column, by its prefix (``learner.objective``'s stats, ``epoch_diagnostics``).
HISTORY_SOURCES = (
    (r"train/loss/", "loss"),
    (r"train/reg(\d+)/", "regularizer {n}"),
    (r"train/aux/", "auxiliary loss"),
    (r"train/model/", "model"),
    (r"mining/", "offline mining"),
    (r"diag/", ""),
    (r"train/", ""),
)
#: What the statistics the built-in methods record measure and their unit, by the column's last part.
HISTORY_STATS: dict[str, tuple[str, str]] = {
    "metric": ("metric-learning loss", "loss"),
    "value": ("weighted term", "loss"),
    "active_fraction": ("active triplets or pairs (non-zero loss)", "fraction"),
    "neg_active_fraction": ("active negative pairs", "fraction"),
    "pos_dist": ("mean same-class distance", "Euclidean distance"),
    "neg_dist": ("mean different-class distance", "Euclidean distance"),
    "pos_sim": ("mean same-class similarity", "cosine similarity"),
    "neg_sim": ("mean different-class similarity", "cosine similarity"),
    "pos_cosine": ("mean similarity to the own proxy", "cosine similarity"),
    "pos_distance": ("mean distance to the own proxy", "Euclidean distance"),
    "pos_term": ("positive term", "loss"),
    "neg_term": ("negative term", "loss"),
    "proxies_in_batch": ("proxies of the batch's classes", "count"),
    "triplets": ("triplets used", "count"),
    "pairs": ("pairs used", "count"),
    "pos_pairs": ("same-class pairs used", "count"),
    "neg_pairs": ("different-class pairs used", "count"),
    "accuracy": ("training accuracy", "fraction"),
    "pair_accuracy": ("pair accuracy", "fraction"),
    "pos_logit": ("mean positive logit", "logit"),
    "xent": ("cross-entropy term", "loss"),
    "ce": ("cross-entropy term", "loss"),
    "beta": ("mean margin boundary β", "Euclidean distance"),
    "mdr": ("MDR regularizer", "loss"),
    "level_penalty": ("MDR level penalty", "loss"),
    "running_mean": ("running mean of pair distances", "Euclidean distance"),
    "running_std": ("running std of pair distances", "Euclidean distance"),
    "mdr_running_mean": ("MDR running mean of pair distances", "Euclidean distance"),
    "mdr_running_std": ("MDR running std of pair distances", "Euclidean distance"),
    "divergence_unweighted": ("ABE divergence loss (unweighted)", "loss"),
    "learner_self_similarity": ("ABE: similarity between learners of the same image", "cosine similarity"),
    "synthetic_hard_fraction": ("synthetic points among the hardest negatives", "fraction"),
    "synthetic_entry_fraction": ("synthetic points among the loss's entries", "fraction"),
    "closer_negative": ("triplets with a negative closer than the positive", "fraction"),
    "farthest_fallback": ("anchors with no harder negative (farthest used)", "fraction"),
    "neighbours": ("neighbours searched per anchor", "count"),
}


def history_label(column: str) -> tuple[str, str]:
    """A history column's panel title (what it measures, and what recorded it) and y-axis label (its
    unit): ``train/loss/pos_dist`` → ("Loss: mean same-class distance", "Euclidean distance"). Statistics
    the table does not know get their name in words and a unit guessed from it."""
    source, stat = "", column
    for pattern, name in HISTORY_SOURCES:
        if m := re.match(pattern, column):
            source = name.format(n=int(m.group(1)) + 1) if m.groups() else name
            stat = column[m.end() :]
            break
    if level := re.fullmatch(r"mdr_level_(\d+)(_pair_share)?", stat):
        n = int(level.group(1)) + 1
        share = level.group(2) is not None
        what = f"MDR: pairs nearest level {n}" if share else f"MDR level {n}"
        unit = "fraction of the pairs" if share else "normalised distance (std units)"
    elif stat in HISTORY_STATS:
        what, unit = HISTORY_STATS[stat]
    else:
        what = stat.replace("/", ": ").replace("_", " ")
        hint = next((u for key, u in _UNIT_HINTS if key in stat), "epoch mean")
        unit = "loss" if source == "auxiliary loss" else hint
    title = f"{source}: {what}" if source else what
    return title[0].upper() + title[1:], unit


#: A unit for a statistic ``HISTORY_STATS`` does not name, by a word in its name (first match).
_UNIT_HINTS = (
    ("fraction", "fraction"),
    ("share", "fraction"),
    ("accuracy", "fraction"),
    ("dist", "distance"),
    ("sim", "cosine similarity"),
    ("cos", "cosine similarity"),
    ("norm", "L2 norm"),
    ("loss", "loss"),
)


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


def plot_importances(imp: pd.DataFrame, order: list[str], stem: Path) -> list[Path]:
    """Each tuned parameter's importance per arm, in the study's arm colours and order."""
    if imp.empty:
        return []
    fig, ax = plt.subplots(figsize=(7, 0.4 * imp.param.nunique() * max(1, imp.arm.nunique() // 2) + 2))
    arms = {
        "hue": "arm",
        "hue_order": [a for a in order if a in set(imp.arm)],
        "palette": pictures.arm_palette(order),
    }
    sns.barplot(data=imp, x="importance", y="param", **arms, saturation=1, ax=ax)
    ax.set(title="Optuna parameter importances of the tune stage (per arm)", ylabel="")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize="small", title="arm")
    return _save(fig, stem)


#: A report figure's title and caption by its file stem: ``{m}`` the study metric's title, ``{k}`` the
#: neighbours a retrieval grid shows, ``{band}`` what a line plot's shaded band is.
CAPTIONS: dict[str, tuple[str, str]] = {
    "learning_curves": (
        "Validation {m} per epoch",
        "Validation {m} (%) of the final runs after each epoch, per arm (validation classes: the test "
        "classes are scored once, at the selected epoch): line = mean over seeds, {band}.",
    ),
    "diagnostics": (
        "Training statistics per epoch",
        "What the losses, regularizers and methods recorded in each epoch of the final runs, one panel per "
        "statistic (title: what it measures; y axis: its unit), per arm: line = mean over seeds, {band}.",
    ),
    "param_importances": (
        "Hyperparameter importances",
        "How much each tuned hyperparameter explains the validation objective across an arm's complete "
        "tune trials (Optuna's default importance evaluator; an arm's importances sum to 1); weak with few "
        "trials (see the caveats).",
    ),
    "retrieval_random": (
        "Retrieval of random test queries",
        "The same random test queries in every arm (one row per arm, its lowest-seed final run): the query "
        "(black frame) and its {k} nearest test images, green frame = same class, red = another class.",
    ),
    "retrieval_hardest": (
        "Retrieval of the hardest test queries",
        "The test queries the baseline arm (named in the title) retrieves worst (fewest same-class images "
        "among its {k} nearest), in every arm (one row per arm, its lowest-seed final run): the query in a "
        "black frame, green frame = same class, red = another class.",
    ),
    "embedding_maps": (
        "t-SNE of the test embeddings",
        "t-SNE of the test embeddings of the first test classes (the same images in every arm), one panel "
        "per arm (its lowest-seed final run); colour = test class (legend). Compact, separate clusters are "
        "classes the embedding separates; distances between clusters mean little in t-SNE.",
    ),
    "mdr_distance_histograms": (
        "MDR: training distances and levels",
        "Per MDR arm, at its first, middle and last epoch: the share of training pairs by normalised "
        "pairwise distance (bars) and the learned levels (red lines).",
    ),
    "abe_learner_similarity": (
        "ABE: similarity between learners",
        "Per ABE arm: mean cosine similarity between the learners' embeddings of the same training image "
        "over the last epoch (learner × learner); the divergence loss pushes the off-diagonal down.",
    ),
    "synthesis_tsne": (
        "Symmetrical synthesis: original and synthetic points",
        "Per synthesis arm, at its first, middle and last epoch: t-SNE of the last training batch's "
        "embeddings (circles) and their synthetic reflections (crosses); colour = class.",
    ),
    "abe_attention_masks": (
        "ABE: attention masks",
        "Each learner's attention mask (sigmoid, mean over channels) over the same test images, one row "
        "per image as the network saw it (framed in the arm's colour), for the arm named in the title.",
    ),
}


def figure_caption(stem: str, meta: dict[str, Any]) -> tuple[str, str]:
    """A report figure's title and caption (what it shows and how to read it), by its file stem; a figure
    this does not know gets its stem in words."""
    m = metric_title(meta.get("metric", "recall@1"))
    band = "shaded band = 95% bootstrap CI of that mean over seeds (no band where an arm has one seed)"
    factors = {slug(f): f for f in meta.get("factors", [])}
    vs = re.fullmatch(r".+_vs_(.+)", stem)
    if stem.endswith("_per_arm"):
        return f"Test {m} per arm", (
            f"Test {m} (%) of each arm's final runs: bar = mean over seeds, black line = 95% bootstrap CI of "
            "the mean over seeds, dots = the single seeds."
        )
    if vs and vs.group(1) in factors:
        f = factors[vs.group(1)]
        by_length = " (by its length: the number of values)" if factor_kind(meta, f) == "length" else ""
        return f"Test {m} against {f}", (
            f"Test {m} (%) against `{f}`{by_length}, one line per setting of the other factors: line = mean "
            f"over seeds, {band}."
        )
    if stem.startswith("heatmap_"):
        return f"Test {m} by pair of factors", (
            f"Mean test {m} (%) for each combination of two factors' levels (rows, columns), averaged over "
            "the other factors and the seeds."
        )
    key = "abe_attention_masks" if stem.startswith("abe_attention_masks_") else stem
    if key in CAPTIONS:
        title, caption = CAPTIONS[key]
        return title.format(m=m), caption.format(m=m, k=pictures.SHOW_K, band=band)
    words = stem.replace("_", " ")
    return words[0].upper() + words[1:], words
