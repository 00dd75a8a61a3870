"""Normalized softmax (NormSoftmax; Zhai & Wu, BMVC 2019): a cosine classifier with a temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.plugins import Reference, set_param_options
from harness.registry import register
from harness.types import LossOutput
from methods.distances import full_precision


def _pml_references() -> list[Reference]:
    """PML's NormalizedSoftmaxLoss, temperature 0.05."""
    from pytorch_metric_learning import losses

    return [Reference(lambda c, d: losses.NormalizedSoftmaxLoss(c, d, temperature=0.05))]


@register("loss", "normalized_softmax", references=_pml_references)
class NormalizedSoftmaxLoss(nn.Module):
    """NormSoftmax (Zhai & Wu 2019): cross-entropy over cosine logits / temperature (0.05).

    logits = x̂·Ŵᵀ / temperature with L2-normalised class weights W [num_classes, D]; the loss is the
    mean cross-entropy. normalize: L2-normalise the embeddings here (the official code normalises in
    the model head; pytorch-metric-learning normalises in the loss). W is initialised like the
    official code (nn.Linear's uniform ±1/√D) and carries ``weight_lr_mult`` (official: 1, the class
    weights train with the model's learning rate). Equal to pytorch-metric-learning's
    NormalizedSoftmaxLoss (whose W is the transpose of ours) for the same weights and temperature.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.05,
        normalize: bool = True,
        weight_lr_mult: float = 1.0,
        num_classes: int,
        embedding_dim: int,
    ):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.uniform_(self.weight, -1 / math.sqrt(embedding_dim), 1 / math.sqrt(embedding_dim))
        set_param_options(self.weight, lr_mult=weight_lr_mult)

    @full_precision
    def forward(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        x = F.normalize(embeddings, dim=1) if self.normalize else embeddings
        logits = x @ F.normalize(self.weight, dim=1).to(x.dtype).T / self.temperature
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            stats = {"accuracy": (logits.argmax(1) == labels).float().mean()}
        return LossOutput(loss, stats)
