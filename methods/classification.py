"""A classification head as a regularizer (kind ``regularizer``): joint metric + cross-entropy training.

MultiGrain (Berman et al. 2019) trains ``λ·CE + (1 − λ)·margin``: a linear classifier on the
(un-normalised) pooled descriptor next to the margin loss on its L2-normalised copy. Here the metric
loss is the run's ``loss`` and this term adds ``weight · CE(Linear(embeddings), labels)``; with the
embedder's ``normalize: none`` and the margin loss's own ``normalize: true`` the classifier sees the
un-normalised vector as in MultiGrain. ``weight = λ / (1 − λ)`` gives MultiGrain's ratio (λ = 0.5 →
1; the overall factor 1 − λ is a learning-rate scale).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from harness.plugins import set_param_options
from harness.registry import register
from harness.types import LossOutput
from methods.distances import full_precision


@register("regularizer", "classification")
class ClassificationHead(nn.Module):
    """Cross-entropy of a linear classifier (with bias, nn.Linear's init) on the embeddings, × weight.

    weight: the term's weight (MultiGrain λ = 0.5 → 1). smoothing: label smoothing (0 in MultiGrain).
    lr_mult: the classifier's learning-rate multiplier.
    """

    def __init__(
        self,
        *,
        weight: Annotated[float, Field(ge=0)] = 1.0,
        smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        lr_mult: Annotated[float, Field(ge=0)] = 1.0,
        num_classes: int,
        embedding_dim: int,
    ):
        super().__init__()
        self.weight, self.smoothing = weight, smoothing
        self.classifier = nn.Linear(embedding_dim, num_classes)
        for param in self.classifier.parameters():
            set_param_options(param, lr_mult=lr_mult)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        logits = self.classifier(embeddings)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        with torch.no_grad():
            stats = {"ce": ce.detach(), "accuracy": (logits.argmax(1) == labels).float().mean()}
        return LossOutput(self.weight * ce, stats)
