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
