"""Pictures of what the embeddings learned, from the runs' saved test embeddings (nothing is retrained):
retrieval grids (a query and its nearest test images, green = same class, red = not, one row per arm for
the same queries) and t-SNE maps of the test embeddings of a few classes, one panel per arm."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from harness.reporting import embeddings, stats  # noqa: E402
from harness.types import metric_title, recall_k  # noqa: E402

log = logging.getLogger(__name__)

#: Neighbours shown per query, queries per grid, and the side of a thumbnail (pixels).
SHOW_K = 6
GRID_QUERIES = 4
THUMB = 96
CORRECT, WRONG = "#1a9850", "#d73027"


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """PNG (150 dpi), SVG and PDF (vector, text kept as text) of ``fig``; closes it."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    for path in paths[1:]:
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths


def paper_style() -> Any:
    """The report's plot style (a context manager): seaborn's paper context, large enough to read in a
    two-column paper, white grid, fonts embedded as text in SVG/PDF."""
    return plt.rc_context(
        {
            **sns.axes_style("whitegrid"),
            **sns.plotting_context("paper", font_scale=1.3),
            "svg.fonttype": "none",
            "pdf.fonttype": 42,
        }
    )


def arm_palette(order: list[str]) -> dict[str, Any]:
    """One colour per arm, fixed by the study's arm order, shared by every plot of the report."""
    colours = sns.color_palette("tab10" if len(order) <= 10 else "husl", len(order))
    return dict(zip(order, colours, strict=True))


def saved_runs(final: pd.DataFrame, order: list[str]) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """Per arm: (run folder, saved arrays) of its lowest-seed final run that kept its test embeddings."""
    out = {}
    for arm in order:
        runs = final[final.arm == arm].sort_values("seed")
        for run_dir in runs.run_dir.dropna():
            saved = embeddings.read(run_dir)
            if saved is not None:
                out[arm] = (str(run_dir), saved)
                break
    return out


@functools.lru_cache(maxsize=4)
def _arrays(data_yaml: str, split: str) -> np.ndarray:
    """Pixels of an in-memory dataset's test (or query) split, read again from the run's data config."""
    from harness.config import validate
    from harness.data import load_splits

    splits = load_splits(validate(json.loads(data_yaml)).data)
    return getattr(splits, split).items


def image_reader(run_dir: str, saved: dict[str, np.ndarray], split: str) -> Callable[[int], np.ndarray]:
    """``index -> uint8 RGB thumbnail`` of the gallery (``test``) or ``query`` split of a run."""
    key = "gallery_items" if split == "test" else "query_items"
    if key in saved:
        paths = saved[key]

        def from_file(i: int) -> np.ndarray:
            with Image.open(paths[i]) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB, THUMB))
                return np.asarray(im)

        return from_file
    raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    pixels = _arrays(json.dumps(raw, sort_keys=True, default=str), split if split == "query" else "test")

    def from_array(i: int) -> np.ndarray:
        a = pixels[i]
        return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a

    return from_array


def grid_queries(base: dict[str, np.ndarray], n: int = GRID_QUERIES) -> dict[str, np.ndarray]:
    """The queries the grids show: ``random`` (fixed seed) and ``hardest`` (fewest correct neighbours in the
    baseline's top ``SHOW_K``, then the latest first correct one)."""
    h = embeddings.hits(base)[:, :SHOW_K]
    q = len(h)
    first = np.where(h.any(1), h.argmax(1), SHOW_K)
    hardest = np.lexsort((np.arange(q), -first, h.sum(1)))[: min(n, q)]
    random = np.sort(np.random.default_rng(0).choice(q, size=min(n, q), replace=False))
    return {"random": random, "hardest": hardest}


def _cell(ax: Any, image: np.ndarray | None, edge: str | None, title: str = "") -> None:
    if image is not None:
        ax.imshow(image, cmap=None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_edgecolor(edge)
            spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=8)


def plot_retrieval_grids(
    runs: dict[str, tuple[str, dict[str, np.ndarray]]], order: list[str], baseline: str | None, folder: Path
) -> list[Path]:
    """One grid per query choice (random, hardest for the baseline): per query, one row per arm with the
    query and its ``SHOW_K`` nearest test images, framed green (same class) or red."""
    arms = [a for a in order if a in runs]
    if not arms:
        return []
    ref = baseline if baseline in runs else arms[0]
    paths: list[Path] = []
    for kind, queries in grid_queries(runs[ref][1]).items():
        fig, axes = plt.subplots(
            len(queries) * len(arms),
            SHOW_K + 1,
            figsize=(1.1 * (SHOW_K + 1) + 2.5, 1.15 * len(queries) * len(arms)),
            squeeze=False,
        )
        for qi, q in enumerate(queries):
            for ai, arm in enumerate(arms):
                run_dir, saved = runs[arm]
                row = axes[qi * len(arms) + ai]
                query_split = "query" if saved["separate_query"] else "test"
                _cell(
                    row[0],
                    image_reader(run_dir, saved, query_split)(int(q)),
                    "black",
                    "query" if qi == ai == 0 else "",
                )
                row[0].set_ylabel(arm, rotation=0, ha="right", va="center", fontsize=8)
                gallery = image_reader(run_dir, saved, "test")
                ok = embeddings.hits(saved)[q]
                for j, g in enumerate(saved["neighbours"][q][:SHOW_K]):
                    _cell(
                        row[j + 1],
                        gallery(int(g)),
                        CORRECT if ok[j] else WRONG,
                        f"#{j + 1}" if qi == ai == 0 else "",
                    )
        title = "random test queries" if kind == "random" else f"the test queries '{ref}' gets most wrong"
        fig.suptitle(
            f"Retrieval: {title}; nearest test images (green frame: same class, red: another class)",
            fontsize=10,
        )
        paths += save_figure(fig, folder / f"retrieval_{kind}")
    return paths


def plot_embedding_maps(
    runs: dict[str, tuple[str, dict[str, np.ndarray]]], order: list[str], folder: Path
) -> list[Path]:
    """t-SNE of the saved test embeddings of the first test classes, one panel per arm, coloured by class."""
    from sklearn.manifold import TSNE

    arms = [a for a in order if a in runs and len(runs[a][1]["map_index"]) >= 5]
    if not arms:
        return []
    cols = min(3, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(arms) :]:
        ax.set_visible(False)
    for ax, arm in zip(axes.flat, arms, strict=False):
        saved = runs[arm][1]
        points = saved["map_embeddings"].astype(np.float32)
        labels = saved["gallery_labels"][saved["map_index"]]
        xy = TSNE(
            n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=0
        ).fit_transform(points)
        sns.scatterplot(
            x=xy[:, 0], y=xy[:, 1], hue=labels.astype(str), palette="tab10", s=12, ax=ax, legend=False
        )
        ax.set(title=arm, xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    fig.suptitle(
        f"t-SNE of test embeddings ({len(np.unique(labels))} test classes, colour = class)", fontsize=10
    )
    return save_figure(fig, folder / "embedding_maps")


def query_bootstrap(
    runs: dict[str, tuple[str, dict[str, np.ndarray]]], order: list[str], ks: list[int]
) -> pd.DataFrame:
    """Per arm (its lowest-seed run): Recall@K over the test queries with a 95% bootstrap CI over queries
    (the uncertainty of one run's number from the finite query set, not seed noise)."""
    rows = []
    for arm in order:
        if arm not in runs:
            continue
        h = embeddings.hits(runs[arm][1])
        for k in ks:
            if k > h.shape[1]:
                continue
            found = h[:, :k].any(1).astype(float)
            lo, hi = stats.bootstrap_mean_ci(found)
            rows.append(
                {
                    "arm": arm,
                    "metric": f"recall@{k}",
                    "queries": len(found),
                    "value": found.mean(),
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return pd.DataFrame(rows)


def query_bootstrap_display(
    boot: pd.DataFrame, tex: bool, escape: Callable[[str], str] = str
) -> pd.DataFrame:
    """The readable per-query bootstrap table (in %)."""
    pct = "\\%" if tex else "%"
    return pd.DataFrame(
        {
            "arm": [escape(a) for a in boot.arm],
            "metric": [escape(metric_title(m)) for m in boot.metric],
            "queries": boot.queries.astype(int),
            f"value ({pct})": [f"{100 * v:.1f}" for v in boot.value],
            f"95{pct} CI over queries": [
                f"[{100 * lo:.1f}, {100 * hi:.1f}]" for lo, hi in zip(boot.ci_low, boot.ci_high, strict=True)
            ],
        }
    )


def recall_ks(metrics: list[str]) -> list[int]:
    """The K of every Recall@K among ``metrics``."""
    return [k for m in metrics if (k := recall_k(m)) is not None]
