"""Small dataclasses passed between stages: the engine's plain-data contract."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """A loss (or regularizer) value and the statistics its readers care about.

    `stats` holds scalars (floats or 0-dim tensors, detached by the engine) such as the number of
    active triplets or the mean positive distance; they flow into the run history.
    """

    value: torch.Tensor
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelOutput:
    """What a model returns for a batch of images.

    embeddings: [B, D] the retrieval embedding (what evaluation ranks with).
    aux_losses: already-weighted auxiliary losses added to the objective (ABE divergence, CGD CE).
    parts: sub-embeddings the metric loss is applied to separately and summed (ABE learners);
        None means the loss sees `embeddings` as a whole.
    stats: per-batch diagnostics (scalars), averaged per epoch into the history.
    """

    embeddings: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: list[torch.Tensor] | None = None
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StageInfo:
    """What a backbone declares about one named stage (as timm's ``feature_info``).

    channels: output channels; reduction: input side / output side (GoogLeNet's pool3: 16, 14×14 at 224).
    """

    name: str
    channels: int
    reduction: int


@dataclass(frozen=True)
class DataConfig:
    """The input convention a backbone declares: transforms read it, users never retype it.

    channel_order "BGR" and scale 255 describe Caffe-style weights (BN-Inception).
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    scale: float = 1.0
    in_channels: int = 3


# -- metric names, defined once: evaluate computes them; train, study and report read them --------------

#: Recall@K in the DML meaning: a query counts if ANY of its K nearest neighbours shares its class (not the
#: information-retrieval recall). Its key is ``recall_name(k)``: ``recall@1``, ``recall@2``, ...
RECALL_PREFIX = "recall@"
#: Ranking metrics besides Recall@K, from the ranked neighbours (definitions: ``harness.evaluate``).
RANKING_METRICS = ("map@r", "r_precision", "precision@1")
#: Clustering metrics: one k-means of the embeddings, scored as NMI and pairwise F1 (slow: on validation only
#: when one of them selects the epoch).
CLUSTERING_METRICS = ("nmi", "f1")
#: Every metric name besides Recall@K.
METRICS = RANKING_METRICS + CLUSTERING_METRICS
#: The metrics tables show after Recall@K (precision@1 equals recall@1).
TABLE_METRICS = ("map@r", "r_precision")
METRIC_TITLES = {
    "map@r": "MAP@R",
    "r_precision": "R-Precision",
    "precision@1": "P@1",
    "nmi": "NMI",
    "f1": "F1",
}


def recall_name(k: int) -> str:
    """The metric key of Recall@``k``."""
    return f"{RECALL_PREFIX}{k}"


def recall_k(metric: str) -> int | None:
    """K of a Recall@K key (``recall@4`` → 4), None for any other metric."""
    k = metric.removeprefix(RECALL_PREFIX)
    return int(k) if metric.startswith(RECALL_PREFIX) and k.isdigit() else None


def metric_title(metric: str) -> str:
    """``recall@1`` → ``Recall@1``, ``map@r`` → ``MAP@R``, ``r_precision`` → ``R-Precision``."""
    k = recall_k(metric)
    return f"Recall@{k}" if k is not None else METRIC_TITLES.get(metric, metric)
