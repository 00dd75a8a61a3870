"""Model assembly: backbone → pooling → embedding head, or a model plugin (ABE) built from config.

Contracts the engine relies on:
- a backbone is a ``StagedBackbone``: ordered named stages, their output channels and the
  ``DataConfig`` its weights expect (input size, mean, std, channel order);
- a pooling module maps ``[B, C, H, W]`` (and optionally the labels) to ``[B, out_dim]`` or to a
  ``ModelOutput`` whose aux losses need the labels (CGD), and has an ``out_dim`` attribute;
- a model maps ``(images, labels=None)`` to a ``ModelOutput`` and has an ``embedding_dim`` attribute.
  Parameters under ``model.backbone`` form the backbone learning-rate group.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Annotated, Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness import registry
from harness.config import RunConfig, split_params
from harness.distributed import batch_gather
from harness.errors import ConfigError
from harness.plugins import InterfaceDeprecationWarning
from harness.registry import register
from harness.types import DataConfig, ModelOutput, StageInfo


class StagedBackbone(nn.Module):
    """A backbone as an ordered sequence of named stages that can be run (or split) at any of them.

    ``forward(x, start=None, end=None)`` runs the stages after ``start`` up to and including
    ``end``, so ``S = (None, branch)`` and ``G = (branch, None)`` split the network at a branching point.
    ``frozen_bn`` keeps every BatchNorm layer in eval mode (fixed statistics) during training.
    Each stage declares its output channels and reduction (``feature_info``), from which pooling, heads and
    model plugins derive what they need without knowing the particular backbone.
    """

    def __init__(
        self,
        stages: OrderedDict[str, nn.Module],
        channels: dict[str, int],
        data_config: DataConfig,
        *,
        reductions: dict[str, int] | None = None,
        frozen_bn: bool = False,
    ):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.data_config = data_config
        if reductions is None:  # a backbone written before `reductions` existed: measured, with a warning
            reductions = self._measure_reductions()
            warnings.warn(
                f"{type(self).__module__}.{type(self).__name__}: StagedBackbone.__init__ without reductions= "
                "is deprecated and will be an error; measured from a forward pass at input size "
                f"{data_config.input_size}: pass reductions={reductions} to super().__init__",
                InterfaceDeprecationWarning,
                stacklevel=2,
            )
        missing = (set(stages) - set(channels)) | (set(stages) - set(reductions))
        assert not missing, f"stage channels or reductions missing for {missing}"
        self.stage_channels = dict(channels)
        self.stage_reductions = dict(reductions)
        self.frozen_bn = frozen_bn

    def _measure_reductions(self) -> dict[str, int]:
        """Each stage's input side / output side on one zero image at the declared input size (on the
        parameters' device: free on torch's meta device), for backbones that do not declare them."""
        size, params = self.data_config.input_size, next(self.parameters(), None)
        device = params.device if params is not None else torch.device("cpu")
        x = torch.zeros(1, self.data_config.in_channels, size, size, device=device)
        was_training, out = self.training, {}
        self.eval()  # no running-statistics update
        try:
            with torch.no_grad():
                for name, stage in self.stages.items():
                    x = stage(x)
                    side = x.shape[-1] if x.dim() == 4 else 1  # a pooled [B, C] stage: the whole image
                    out[name] = max(1, round(size / side))
        finally:
            nn.Module.train(self, was_training)
        return out

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def feature_info(self) -> list[StageInfo]:
        """Channels and reduction of every stage, in order."""
        return [StageInfo(s, self.stage_channels[s], self.stage_reductions[s]) for s in self.stage_names]

    @property
    def out_channels(self) -> int:
        return self.stage_channels[self.stage_names[-1]]

    def check_stage(self, name: str, what: str = "stage") -> None:
        if name not in self.stages:
            raise ConfigError(
                f"{what} {name!r} is not a stage of {type(self).__name__} "
                f"(stages: {', '.join(self.stage_names)})"
            )

    def stage_range(self, start: str | None = None, end: str | None = None) -> list[str]:
        """Names of the stages strictly after ``start`` through ``end`` (inclusive)."""
        names = self.stage_names
        i = 0 if start is None else names.index(start) + 1
        j = len(names) if end is None else names.index(end) + 1
        return names[i:j]

    def forward(self, x: torch.Tensor, start: str | None = None, end: str | None = None) -> torch.Tensor:
        for name in self.stage_range(start, end):
            x = self.stages[name](x)
        return x

    def train(self, mode: bool = True) -> StagedBackbone:
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def mean_distance_scale(e: torch.Tensor) -> torch.Tensor:
    """Divide a batch by its mean off-diagonal pairwise Euclidean distance (MDR 6.1; not detached), in
    float32 whatever the autocast dtype (the official code trains MDR in fp32: the scale of small
    distances must not be rounded to bf16). In a DDP run the mean is the global batch's."""
    e = e.float()
    batch = batch_gather(e)  # a DDP run's global batch: the scale of one process
    b = batch.shape[0]
    if b < 2:
        return e
    with torch.autocast(device_type=e.device.type, enabled=False):
        d = torch.cdist(batch, batch)
        return e / (d.sum() / (b * (b - 1))).clamp_min(1e-12)


@register("model", "embedder")
class Embedder(nn.Module):
    """backbone → pooling → linear embedding head → normalisation (l2, none, or MDR's mean_distance)."""

    def __init__(
        self,
        *,
        backbone: StagedBackbone,
        pooling: nn.Module,
        embedding_dim: Annotated[int, Field(ge=1)] = 128,
        head: bool = True,
        normalize: Literal["l2", "none", "mean_distance"] = "l2",
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        in_dim = int(cast(int, pooling.out_dim))  # every pooling declares out_dim (harness.plugins)
        self.head = nn.Linear(in_dim, embedding_dim) if head else nn.Identity()
        self.embedding_dim = embedding_dim if head else in_dim
        self.normalize = normalize

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        pooled = self.pooling(self.backbone(images), labels)
        aux: dict[str, torch.Tensor] = {}
        if isinstance(pooled, ModelOutput):
            aux, pooled = pooled.aux_losses, pooled.embeddings
        e = self.head(pooled)
        if self.normalize == "l2":
            e = F.normalize(e, dim=-1)
        elif self.normalize == "mean_distance" and self.training:
            e = mean_distance_scale(e)
        return ModelOutput(embeddings=e, aux_losses=aux)


def build_component(cfg_spec: dict[str, Any], kind: str, path: str, **context: Any) -> Any:
    name, params = split_params(cfg_spec)
    return registry.build(kind, name, context=context, path=path, **params)


def build_model(cfg: RunConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build backbone, pooling and the model plugin (``in_channels``: the dataset's image channels)."""
    backbone = build_component(cfg.backbone, "backbone", "backbone", in_channels=in_channels)
    if not isinstance(backbone, StagedBackbone):
        raise ConfigError(f"backbone: {cfg.backbone['name']!r} does not build a StagedBackbone")
    pooling = build_component(
        cfg.pooling, "pooling", "pooling", in_channels=backbone.out_channels, num_classes=num_classes
    )
    return build_component(
        cfg.model, "model", "model", backbone=backbone, pooling=pooling, num_classes=num_classes
    )
