"""The test embeddings a run keeps for the report: retrieval grids, embedding maps, per-query statistics.

A run's final test evaluation hands its embeddings to ``capture``; ``rundir.write_run`` writes the arrays
to ``<run_dir>/test_embeddings.npz``. Compact by construction (SOP: about 2 MB):

- ``neighbours`` int32 [Q, TOP_K]: every test query's nearest gallery items (the retrieval the metrics
  scored), with ``query_labels`` / ``gallery_labels`` int64. Without a separate query set (every dataset
  but In-Shop) the gallery is the query set, itself excluded.
- ``map_index`` int32 / ``map_embeddings`` float16: the gallery items of the first ``MAP_CLASSES`` test
  classes (at most ``MAP_POINTS``), for the t-SNE maps; the same items in every arm.
- ``gallery_items`` / ``query_items``: image paths, for datasets read from files. In-memory datasets
  (digits, fashion_mnist) store none: the report reads their pixels again from the run's config.
- ``attention_masks`` float16 [M, N, h, w] / ``attention_index`` int32 [N] / ``attention_images`` uint8
  [N, H, W, 3], for models with attention (``harness.plugins.AttentionMaps``, ABE-M): each learner's mask
  of the first test image of each of the first ``ATTENTION_IMAGES`` test classes (the same images in every
  arm) and those images as the network saw them (the test transform's crop and size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.images import ImageSet
from harness.data.transforms import pil_steps
from harness.evaluate import knn
from harness.plugins import AttentionMaps

log = logging.getLogger(__name__)

FILE = "test_embeddings.npz"
TOP_K = 8
MAP_CLASSES = 10
MAP_POINTS = 1000
ATTENTION_IMAGES = 4


def capture(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    query: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    sets: dict[str, Any],
    distance: str = "cosine",
) -> dict[str, np.ndarray]:
    """The arrays of ``FILE`` from one test evaluation (``sets``: the trainer's eval sets, ``test`` and
    optionally ``query``, whose ``items`` are paths or pixels)."""
    g_labels = gallery_labels.cpu().numpy().astype(np.int64)
    _, idx = knn(gallery, TOP_K, query, distance=distance)  # type: ignore[arg-type]
    out: dict[str, np.ndarray] = {
        "neighbours": idx.cpu().numpy().astype(np.int32),
        "gallery_labels": g_labels,
        "query_labels": g_labels if query_labels is None else query_labels.cpu().numpy().astype(np.int64),
        "separate_query": np.asarray(query is not None),
    }
    classes = np.unique(g_labels)[:MAP_CLASSES]
    pick = np.flatnonzero(np.isin(g_labels, classes))[:MAP_POINTS]
    out["map_index"] = pick.astype(np.int32)
    out["map_embeddings"] = gallery[torch.as_tensor(pick, dtype=torch.long)].cpu().numpy().astype(np.float16)
    for key, name in (("gallery_items", "test"), ("query_items", "query")):
        items = getattr(sets.get(name), "items", None)
        if items is not None and items.dtype == object:  # paths (pixels are read again from the config)
            out[key] = np.asarray(items, dtype=str)
    return out


@torch.no_grad()
def attention(model: AttentionMaps, test: ImageSet, device: torch.device) -> dict[str, np.ndarray]:
    """The ``attention_*`` arrays of ``FILE`` from ``model`` (in eval mode) on the test split ``test`` (with
    the test transform); none when the model's configuration has no attention."""
    pick = np.unique(test.labels, return_index=True)[1][:ATTENTION_IMAGES]
    images = torch.stack([test[int(i)][0] for i in pick]).to(device)
    maps = model.attention_maps(images)
    if maps is None:
        return {}
    shown = pil_steps(test.transform)
    return {
        "attention_masks": maps.float().cpu().numpy().astype(np.float16),
        "attention_index": pick.astype(np.int32),
        "attention_images": np.stack([np.asarray(shown(test.image(int(i))).convert("RGB")) for i in pick]),
    }


def write(directory: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``directory/FILE`` (nothing when empty)."""
    if arrays:
        np.savez_compressed(Path(directory) / FILE, allow_pickle=False, **arrays)


def read(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """A run's saved test embeddings (None when the run kept none or its folder is elsewhere)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def hits(saved: dict[str, np.ndarray]) -> np.ndarray:
    """[Q, TOP_K] bool: neighbour j of query i shares its class (Recall@K of query i = any of the first K)."""
    return saved["gallery_labels"][saved["neighbours"]] == saved["query_labels"][:, None]
