"""Pictures of the method diagnostics a run recorded per epoch (``diagnostics.json``, written from the
components' ``epoch_diagnostics()``): MDR's histogram of normalised training distances with its learned
levels, and ABE's learner × learner self-similarity. Found by key suffix, so any component that records
the same names is drawn too; runs without them draw nothing. Also the attention masks a model with attention
(ABE-M) saved with its test embeddings, over the test images they are of."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize, to_rgb  # noqa: E402
from PIL import Image  # noqa: E402

from harness.reporting.figures import THUMB, arm_palette, save_figure, saved_runs, tsne_2d  # noqa: E402
from harness.reporting.plots import slug  # noqa: E402

#: Epochs shown of a run's history of histograms: the first, the middle and the last.
HIST_EPOCHS = 3
#: Colour map and opacity of the attention masks drawn over their image.
ATTENTION_CMAP, ATTENTION_ALPHA = "inferno", 0.6


def records(run_dir: str | Path, suffix: str) -> list[tuple[int, Any]]:
    """(epoch, value) of every diagnostics record whose key ends with ``/<suffix>``, by epoch."""
    path = Path(run_dir) / "diagnostics.json"
    if not path.is_file():
        return []
    out = []
    for row in json.loads(path.read_text()) or []:
        for key, value in row.items():
            if key.endswith("/" + suffix) and value is not None:
                out.append((int(row["epoch"]), value))
    return sorted(out, key=lambda r: r[0])


def _first_run(final: pd.DataFrame, arm: str, suffix: str) -> str | None:
    """The lowest-seed final run of ``arm`` that recorded ``suffix``."""
    for run_dir in final[final.arm == arm].sort_values("seed").run_dir.dropna():
        if records(run_dir, suffix):
            return str(run_dir)
    return None


def _pick(n: int, k: int = HIST_EPOCHS) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def _arm_epoch_grid(n_arms: int, row_height: float) -> tuple[Any, np.ndarray]:
    """A figure of one row per arm and ``HIST_EPOCHS`` columns (the epochs ``_pick`` shows)."""
    return plt.subplots(n_arms, HIST_EPOCHS, figsize=(4 * HIST_EPOCHS, row_height * n_arms), squeeze=False)


def plot_synthesis_maps(final: pd.DataFrame, order: list[str], folder: Path) -> list[Path]:
    """Per symmetrical-synthesis arm (row) and a few epochs (columns): t-SNE of the last training batch's
    original embeddings (filled circles) and their synthetic reflections (crosses), coloured by class."""
    from matplotlib.lines import Line2D

    arms = {a: d for a in order if (d := _first_run(final, a, "synthesis_snapshot"))}
    if not arms:
        return []
    fig, axes = _arm_epoch_grid(len(arms), row_height=3.8)
    for row, (arm, run_dir) in zip(axes, arms.items(), strict=True):
        snaps = records(run_dir, "synthesis_snapshot")
        picks = _pick(len(snaps))
        for ax in row[len(picks) :]:
            ax.set_visible(False)
        for ax, i in zip(row, picks, strict=False):
            epoch, snap = snaps[i]
            original, synthetic = (np.asarray(snap[k], dtype=float) for k in ("original", "synthetic"))
            xy = tsne_2d(np.concatenate([original, synthetic]))
            classes = np.unique(snap["labels"], return_inverse=True)[1]
            colours = np.asarray(sns.color_palette("husl", int(classes.max()) + 1))[classes]
            n = len(original)
            ax.scatter(xy[:n, 0], xy[:n, 1], c=colours, marker="o", s=28, edgecolors="white", linewidths=0.4)
            ax.scatter(xy[n:, 0], xy[n:, 1], c=colours, marker="x", s=28, linewidths=1.2)
            ax.set(title=f"{arm}, epoch {epoch}", xlabel="t-SNE 1", ylabel="t-SNE 2")
            ax.title.set_fontsize(9)
    handles = [
        Line2D([], [], color="0.3", marker="o", linestyle="", label="original embedding"),
        Line2D(
            [], [], color="0.3", marker="x", linestyle="", label="synthetic (reflection about a classmate)"
        ),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, title="colour = class")
    fig.suptitle(
        "Symmetrical synthesis: original and synthetic points of the last training batch", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, folder / "synthesis_tsne")


def plot_mdr_histograms(final: pd.DataFrame, order: list[str], folder: Path) -> list[Path]:
    """Per MDR arm (row) and a few epochs (columns): the histogram of normalised pairwise training distances
    of that epoch, with the learned levels as vertical lines."""
    arms = {a: d for a in order if (d := _first_run(final, a, "mdr_hist_counts"))}
    if not arms:
        return []
    fig, axes = _arm_epoch_grid(len(arms), row_height=2.8)
    for row, (arm, run_dir) in zip(axes, arms.items(), strict=True):
        counts, edges = records(run_dir, "mdr_hist_counts"), dict(records(run_dir, "mdr_hist_edges"))
        levels = dict(records(run_dir, "mdr_levels"))
        picks = _pick(len(counts))
        for ax in row[len(picks) :]:
            ax.set_visible(False)
        for ax, i in zip(row, picks, strict=False):
            epoch, c = counts[i]
            e = np.asarray(edges[epoch], dtype=float)
            c = np.asarray(c, dtype=float)
            ax.bar(
                e[:-1], c / max(c.sum(), 1), width=np.diff(e), align="edge", color="#9ecae1", edgecolor="none"
            )
            for level in levels.get(epoch, []):
                ax.axvline(level, color="#d73027", linewidth=1.5)
            ax.set(
                title=f"{arm}, epoch {epoch}", xlabel="normalised pairwise distance", ylabel="share of pairs"
            )
            ax.title.set_fontsize(9)
    fig.suptitle(
        "MDR: distances of the training pairs (bars) and the learned levels (red lines)", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, folder / "mdr_distance_histograms")


def plot_learner_similarity(final: pd.DataFrame, order: list[str], folder: Path) -> list[Path]:
    """Per ABE arm: the mean cosine similarity between learners' embeddings of the same training image over
    its last epoch (learner × learner; the divergence loss pushes the off-diagonal down)."""
    arms = {a: d for a in order if (d := _first_run(final, a, "learner_self_similarity_matrix"))}
    if not arms:
        return []
    fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3.4), squeeze=False)
    for ax, (arm, run_dir) in zip(axes[0], arms.items(), strict=True):
        epoch, matrix = records(run_dir, "learner_self_similarity_matrix")[-1]
        m = np.asarray(matrix, dtype=float)
        labels = [str(i + 1) for i in range(len(m))]
        sns.heatmap(
            m,
            vmin=-1,
            vmax=1,
            cmap="RdBu_r",
            annot=len(m) <= 8,
            fmt=".2f",
            square=True,
            ax=ax,
            xticklabels=labels,
            yticklabels=labels,
            cbar_kws={"label": "cosine similarity"},
        )
        ax.set(title=f"{arm}\n(epoch {epoch})", xlabel="learner", ylabel="learner")
        ax.title.set_fontsize(9)
    fig.suptitle("ABE: similarity of the learners' embeddings of the same training image", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, folder / "abe_learner_similarity")


def _overlay(image: np.ndarray, mask: np.ndarray | None, size: int = THUMB) -> np.ndarray:
    """A square uint8 RGB image as a ``size`` tile (nearest when enlarging tiny images) with ``mask`` [h, w]
    in [0, 1] upsampled bilinearly over the whole of it, in ``ATTENTION_CMAP`` at ``ATTENTION_ALPHA``."""
    im = Image.fromarray(image)
    resample = Image.Resampling.NEAREST if im.width < size else Image.Resampling.LANCZOS
    tile = np.asarray(im.resize((size, size), resample), dtype=np.float32)
    if mask is None:
        return tile.astype(np.uint8)
    m = Image.fromarray(mask.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    colour = 255 * plt.get_cmap(ATTENTION_CMAP)(np.clip(np.asarray(m), 0, 1))[..., :3]
    return ((1 - ATTENTION_ALPHA) * tile + ATTENTION_ALPHA * colour).round().astype(np.uint8)


def plot_attention_masks(final: pd.DataFrame, order: list[str], folder: Path) -> list[Path]:
    """Per arm with saved attention masks (ABE-M), one mosaic: a row per test image (the same images in every
    arm, as the network saw them, framed in the arm's colour), then each learner's mask (mean over channels)
    upsampled over it."""
    runs = {a: saved for a, (_, saved) in saved_runs(final, order).items() if "attention_masks" in saved}
    colours = arm_palette(order)
    gap, frame = THUMB // 12, 4
    spacer = np.full((THUMB, gap, 3), 255, np.uint8)
    paths: list[Path] = []
    for arm, saved in runs.items():
        masks, images, index = saved["attention_masks"], saved["attention_images"], saved["attention_index"]
        rgb = (255 * np.asarray(to_rgb(colours[arm]))).astype(np.uint8)
        m = len(masks)
        rows = []
        for r, image in enumerate(images):
            first = _overlay(image, None)
            first[:frame] = first[-frame:] = rgb
            first[:, :frame] = first[:, -frame:] = rgb
            cells = [first] + [_overlay(image, masks[j, r]) for j in range(m)]
            rows.append(np.concatenate([c for cell in cells for c in (cell, spacer)][:-1], axis=1))
            rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
        mosaic = np.concatenate(rows[:-1], axis=0)
        fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 80 + 3, mosaic.shape[0] / 80 + 1))
        ax.imshow(mosaic, interpolation="nearest")
        step = THUMB + gap
        ax.set_xticks(
            [j * step + THUMB / 2 for j in range(m + 1)], ["image"] + [f"learner {j + 1}" for j in range(m)]
        )
        labels = saved["gallery_labels"][index]
        ax.set_yticks(
            [r * step + THUMB / 2 for r in range(len(images))],
            [f"test image {i}\n(class {c})" for i, c in zip(index, labels, strict=True)],
            fontsize=8,
        )
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        scale = ScalarMappable(Normalize(0, 1), cmap=ATTENTION_CMAP)
        fig.colorbar(scale, ax=ax, label="attention (sigmoid)", fraction=0.04, pad=0.02)
        ax.set_title(f"ABE: each learner's attention mask over test images\n{arm}", fontsize=10)
        paths += save_figure(fig, folder / f"abe_attention_masks_{slug(arm)}", vector=(".pdf",))  # bitmaps
    return paths


#: The method pictures ``write_report`` draws, in order: each ``(final runs, arm order, plots folder) ->
#: files written`` draws nothing for a study whose runs did not record what it needs.
PLOTS: list[Callable[[pd.DataFrame, list[str], Path], list[Path]]] = [
    plot_mdr_histograms,
    plot_learner_similarity,
    plot_attention_masks,
    plot_synthesis_maps,
]
