"""Pictures of what the embeddings learned, from the runs' saved test embeddings (nothing is retrained):
retrieval grids (a query and its nearest test images, green = same class, red = not, one row per arm for
the same queries) and t-SNE maps of the test embeddings of a few classes, one panel per arm."""

from __future__ import annotations

import json
import logging
import textwrap
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
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from harness.reporting import embeddings, stats  # noqa: E402
from harness.types import metric_title, recall_k  # noqa: E402

log = logging.getLogger(__name__)

#: Neighbours shown per query, queries per grid, and the side of a thumbnail (pixels).
SHOW_K = 5
GRID_QUERIES = 4
THUMB = 96
CORRECT, WRONG = "#1a9850", "#d73027"
#: Up to this many points t-SNE runs exactly (quicker there than Barnes-Hut).
EXACT_TSNE = 300


def save_figure(fig: Any, stem: Path, vector: tuple[str, ...] = (".svg", ".pdf")) -> list[Path]:
    """PNG (150 dpi) and the ``vector`` formats (text kept as text) of ``fig``; closes it."""
    paths = [stem.with_suffix(s) for s in (".png", *vector)]
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


#: Pixels of in-memory test splits read again for the grids, by the JSON of their data config section.
_PIXELS: dict[tuple[str, str], np.ndarray] = {}


def _arrays(config: dict[str, Any], split: str) -> np.ndarray:
    """Pixels of an in-memory dataset's test (or query) split, read again from a run's resolved config
    (once per data section: arms that differ in anything else share them)."""
    from harness.config import validate
    from harness.data import load_splits

    key = (json.dumps(config.get("data"), sort_keys=True, default=str), split)
    if key not in _PIXELS:
        _PIXELS.clear()  # one study's dataset at a time
        splits = load_splits(validate(config).data)
        _PIXELS[key] = getattr(splits, split).items
    return _PIXELS[key]


def image_reader(run_dir: str, saved: dict[str, np.ndarray], split: str) -> Callable[[int], np.ndarray]:
    """``index -> uint8 RGB thumbnail`` of the gallery (``test``) or ``query`` split of a run."""
    key = "gallery_items" if split == "test" else "query_items"
    if key in saved:
        paths = saved[key]

        def from_file(i: int) -> np.ndarray:
            with Image.open(paths[i]) as im:
                im = im.convert("RGB")
                im.thumbnail((2 * THUMB, 2 * THUMB))  # decode large photos small (the tile fits it exactly)
                return np.asarray(im)

        return from_file
    raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    pixels = _arrays(raw, split)

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


def _tile(image: np.ndarray, edge: str, size: int = THUMB, border: int = 5) -> np.ndarray:
    """``image`` fitted into a ``size`` square on white, framed by ``border`` pixels of colour ``edge``."""
    im = Image.fromarray(image)
    scale = (size - 2 * border) / max(im.size)  # up (tiny digits, nearest) or down (photos, smooth)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
        Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS,
    )
    rgb = np.array([int(edge[k : k + 2], 16) for k in (1, 3, 5)], dtype=np.uint8)
    tile = np.empty((size, size, 3), dtype=np.uint8)
    tile[:] = rgb
    inner = np.full((size - 2 * border, size - 2 * border, 3), 255, dtype=np.uint8)
    a = np.asarray(im)
    top, left = (inner.shape[0] - a.shape[0]) // 2, (inner.shape[1] - a.shape[1]) // 2
    inner[top : top + a.shape[0], left : left + a.shape[1]] = a
    tile[border:-border, border:-border] = inner
    return tile


def plot_retrieval_grids(
    runs: dict[str, tuple[str, dict[str, np.ndarray]]], order: list[str], baseline: str | None, folder: Path
) -> list[Path]:
    """One grid per query choice (random, hardest for the baseline): per query, one row per arm with the
    query (black frame) and its ``SHOW_K`` nearest test images, framed green (same class) or red."""
    arms = [a for a in order if a in runs]
    if not arms:
        return []
    ref = baseline if baseline in runs else arms[0]
    readers = {
        arm: (
            image_reader(run_dir, saved, "query" if saved["separate_query"] else "test"),
            image_reader(run_dir, saved, "test"),
        )
        for arm, (run_dir, saved) in runs.items()
    }
    gap = THUMB // 8
    paths: list[Path] = []
    for kind, queries in grid_queries(runs[ref][1]).items():
        rows = []
        for q in queries:
            for arm in arms:
                saved = runs[arm][1]
                query_reader, gallery = readers[arm]
                ok = embeddings.hits(saved)[q]
                cells = [_tile(query_reader(int(q)), "#000000")]
                cells += [
                    _tile(gallery(int(g)), CORRECT if ok[j] else WRONG)
                    for j, g in enumerate(saved["neighbours"][q][:SHOW_K])
                ]
                cells += [np.full((THUMB, THUMB, 3), 255, np.uint8)] * (SHOW_K + 1 - len(cells))
                spacer = np.full((THUMB, gap, 3), 255, np.uint8)  # between the query and its neighbours
                rows.append(np.concatenate([cells[0], spacer, *cells[1:]], axis=1))
            rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))  # between queries
        mosaic = np.concatenate(rows[:-1], axis=0)
        fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 80 + 2.5, mosaic.shape[0] / 80 + 0.8))
        ax.imshow(mosaic, interpolation="nearest")
        step = THUMB * len(arms) + gap
        ax.set_yticks(
            [qi * step + ai * THUMB + THUMB / 2 for qi in range(len(queries)) for ai in range(len(arms))],
            [arm for _ in queries for arm in arms],
            fontsize=8,
        )
        ax.set_xticks(
            [THUMB / 2] + [THUMB + gap + j * THUMB + THUMB / 2 for j in range(SHOW_K)],
            ["query"] + [f"#{j + 1}" for j in range(SHOW_K)],
        )
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        title = "random test queries" if kind == "random" else f"the test queries '{ref}' gets most wrong"
        ax.set_title(
            f"Retrieval: {title}; nearest test images\n(green frame: same class, red: another class)",
            fontsize=10,
        )
        paths += save_figure(fig, folder / f"retrieval_{kind}", vector=(".pdf",))  # an SVG of bitmaps: no
    return paths


def tsne_2d(points: np.ndarray) -> np.ndarray:
    """2-D t-SNE of ``points`` (fixed seed, PCA start, perplexity at most a third of the points; exact on
    few points, where it is faster). On one thread: sklearn's Barnes-Hut t-SNE with OpenMP threads on a
    busy machine (a study's other workers) was measured 2.2× slower than one thread, and reports took
    20 minutes."""
    from sklearn.manifold import TSNE  # slow to import: only for reports that draw it
    from threadpoolctl import threadpool_limits

    perplexity = min(30.0, max((len(points) - 1) / 3, 1.0))
    method = "exact" if len(points) <= EXACT_TSNE else "barnes_hut"
    with threadpool_limits(1):
        return TSNE(
            n_components=2, perplexity=perplexity, init="pca", method=method, random_state=0
        ).fit_transform(points)


def plot_embedding_maps(
    runs: dict[str, tuple[str, dict[str, np.ndarray]]], order: list[str], folder: Path
) -> list[Path]:
    """t-SNE of the saved test embeddings of the first test classes, one panel per arm, coloured by class."""
    arms = [a for a in order if a in runs and len(runs[a][1]["map_index"]) >= 5]
    collapsed = [a for a in arms if len(np.unique(runs[a][1]["map_embeddings"], axis=0)) < 2]
    if collapsed:  # t-SNE's PCA start divides by the spread of the points: NaN
        log.info("t-SNE maps: %s left out (every test embedding is the same point)", ", ".join(collapsed))
        arms = [a for a in arms if a not in collapsed]
    if not arms:
        return []
    cols = min(3, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(arms) :]:
        ax.set_visible(False)
    classes = np.unique(np.concatenate([runs[a][1]["gallery_labels"][runs[a][1]["map_index"]] for a in arms]))
    palette = sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))
    colours = dict(zip(classes.tolist(), palette, strict=True))  # the same class colours in every panel
    for ax, arm in zip(axes.flat, arms, strict=False):
        saved = runs[arm][1]
        labels = saved["gallery_labels"][saved["map_index"]]
        xy = tsne_2d(saved["map_embeddings"].astype(np.float32))
        ax.scatter(xy[:, 0], xy[:, 1], c=[colours[c] for c in labels.tolist()], s=12, linewidths=0)
        ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
        ax.set_title("\n".join(textwrap.wrap(arm, 36)), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    handles = [
        Line2D([], [], color=colour, marker="o", linestyle="", label=str(c)) for c, colour in colours.items()
    ]
    fig.legend(handles=handles, title="test class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"t-SNE of test embeddings ({len(classes)} test classes, colour = class)", fontsize=10)
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
