"""ABE-M: attention-based ensemble (Kim, Goyal, Chawla, Lee, Kwon, ECCV 2018), METHODS.md §5.

The backbone is split at a branching point into a spatial feature extractor S (stages through ``branch``)
and a global embedding function G (the stages after it, then pooling, a linear layer and L2 normalisation).
M attention modules A_m share a trunk (a separate copy of the stages after ``branch`` through
``attention_depth``) and end in a per-learner 1×1 conv + sigmoid giving a mask of S's shape; learner m is
``f_m(x) = G(S(x) ⊙ A_m(S(x)))``. G is shared: the M masked maps go through it as one batch of M·B.
The metric loss is applied per learner (``ModelOutput.parts``) and summed by the engine; the divergence loss
pushes the learners' embeddings of the same image apart.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.errors import ConfigError
from harness.model import StagedBackbone
from harness.plugins import BenchVariant
from harness.registry import register
from harness.types import ModelOutput


def divergence_loss(parts: torch.Tensor, margin: float) -> torch.Tensor:
    """ABE's divergence loss: per image Σ_{m<n} [margin − ‖f_m(x) − f_n(x)‖²]₊, averaged over the batch.

    ``parts``: [M, B, d] learner embeddings. For unit vectors ‖f_m − f_n‖² = 2 − 2·cos, so ``margin`` = 1
    asks every two learners to keep their embeddings of an image at cosine similarity ≤ 0.5.
    """
    m = parts.shape[0]
    f = parts.transpose(0, 1)  # [B, M, d]
    sq = (f * f).sum(-1)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * f @ f.transpose(1, 2)).clamp_min(0)  # [B, M, M]
    i, j = torch.triu_indices(m, m, offset=1, device=parts.device)
    return F.relu(margin - d2[:, i, j]).sum(1).mean()


#: ABE attends to mid-level features: the paper splits GoogLeNet at pool3 and runs the attention trunk through
#: inception4e, the stages at 1/16 of the input (14×14 at 224).
MID_LEVEL_REDUCTION = 16


def default_split(backbone: StagedBackbone) -> tuple[str, str]:
    """(branch, attention_depth) from the backbone's declared stage reductions, for any backbone.

    The attention trunk ends at the last stage, other than the final one, whose reduction is at most
    ``MID_LEVEL_REDUCTION``; S ends at the first stage of that reduction when it comes earlier, else at the
    stage just before (GoogLeNet: pool3 / inception4e, BN-Inception: inception3c / inception4d, ResNet-50:
    layer2 / layer3, the small convnet: block2 / block3).
    """
    names, reduction = backbone.stage_names, backbone.stage_reductions
    mid = [s for s in names[:-1] if reduction[s] <= MID_LEVEL_REDUCTION] or names[-1:]
    depth = mid[-1]
    first = next(s for s in names if reduction[s] == reduction[depth])
    return (first if first != depth else names[max(names.index(depth) - 1, 0)]), depth


def _freeze_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register(
    "model",
    "abe",
    bench=[BenchVariant(f"ABE-M, M={m}", {"model": {"name": "abe", "m": m}}) for m in (1, 2, 4, 8)],
)
class ABE(nn.Module):
    """ABE-M attention-based ensemble: M attention-masked learners sharing S and G, plus a divergence loss.

    Hyperparameters:
      m: number of learners M; ``embedding_dim`` (divisible by M) is split into M unit-norm parts of
        ``embedding_dim / M`` each, concatenated into the retrieval embedding (so the squared distance between
        two ensemble embeddings is Σ_m ‖f_m(x) − f_m(y)‖², and cosine ranking gives the same order).
      branch: last stage of S; None → derived from the backbone's stage reductions (``default_split``;
        GoogLeNet: pool3).
      attention_depth: last stage of the attention trunk; None → ``default_split``'s (GoogLeNet:
        inception4e) when it lies after ``branch``, else the final stage. An attention map whose
        size differs from S's is resized to it (bilinear).
      lambda_div: weight of the divergence loss (reported as aux loss "divergence"; skipped when 0 or M = 1).
      m_div: margin of the divergence hinge on squared Euclidean distances between unit-norm learner
        embeddings (range 0–4); the paper's m_div = 1 (cosine similarity ≤ 0.5). The paper's metric loss is
        contrastive with m_c = 1: ``loss: {name: contrastive, neg_margin: 1.0, normalize: true}``.
      init: initialisation of the last (embedding) layers and the attention 1×1 convs: "default" (PyTorch's)
        or "xavier" (Glorot uniform per learner, zero biases: the paper's; each learner's 1×1 conv block
        gets its own fan-out, as if the M convs were separate).
      variant: "attention" (ABE-M) or "heads" (the paper's M-heads ensemble: no attention; every head has its
        own copy of the stages after ``branch`` plus its own linear layer; with ``branch`` = the final stage
        the heads are M linear layers on the shared backbone output). ``attention_depth`` is unused there.
      attention: "shared_trunk" (one copy of the stages after ``branch`` through ``attention_depth`` for all
        learners, then a per-learner 1×1 conv: the layout of the Keras port) or "per_learner" (each learner's
        attention module A_m has its own copy of those stages and its own 1×1 conv, as the paper's Fig. 2
        draws M modules; M times the trunk's parameters and compute).

    Parameters of S and G stay under ``self.backbone`` (backbone learning rate); the attention trunk, the
    1×1 convs, the linear layers and the heads' stage copies are head parameters. ``frozen_bn`` of the
    backbone also freezes the BN layers of those copies. With ``variant="heads"`` and M = 1 the model is the
    single-learner baseline (the ``embedder`` model with an L2-normalised linear head).
    ``epoch_diagnostics()`` reports the mean cosine similarity between different learners' embeddings of the
    same image (the paper's self-pair similarity), over the training batches of the epoch;
    ``attention_maps(images)`` gives each learner's mask of the images (the report draws a few test images');
    ``learner_columns()`` each learner's columns of the embedding (the run's per-learner test metrics).
    """

    def __init__(
        self,
        *,
        backbone: StagedBackbone,
        pooling: nn.Module,
        m: Annotated[int, Field(ge=1)] = 8,
        embedding_dim: Annotated[int, Field(ge=1)] = 512,
        branch: str | None = None,
        attention_depth: str | None = None,
        lambda_div: Annotated[float, Field(ge=0)] = 1.0,
        m_div: Annotated[float, Field(ge=0, le=4)] = 1.0,
        variant: Literal["attention", "heads"] = "attention",
        init: Literal["default", "xavier"] = "default",
        attention: Literal["shared_trunk", "per_learner"] = "shared_trunk",
    ):
        super().__init__()
        if embedding_dim % m:
            raise ConfigError(f"embedding_dim: {embedding_dim} is not divisible by m = {m}")
        names = backbone.stage_names
        default_branch, default_depth = default_split(backbone)
        branch = branch or default_branch
        backbone.check_stage(branch, "branch")
        after = backbone.stage_range(branch)
        if variant == "attention":
            if not after:
                raise ConfigError(f"branch: {branch!r} is the final stage; G needs stages after it")
            if attention_depth is None:
                attention_depth = default_depth if default_depth in after else names[-1]
            backbone.check_stage(attention_depth, "attention_depth")
            if attention_depth not in after:
                raise ConfigError(
                    f"attention_depth: {attention_depth!r} must come after branch {branch!r} "
                    f"(one of {', '.join(after)})"
                )
        self.backbone = backbone
        self.pooling = pooling
        self.m = m
        self.embedding_dim = embedding_dim
        self.branch = branch
        self.attention_depth = attention_depth if variant == "attention" else None
        self.lambda_div = lambda_div
        self.m_div = m_div
        self.variant = variant
        self.init = init
        self.attention = attention
        in_dim, part_dim = int(pooling.out_dim), embedding_dim // m
        if variant == "attention":
            trunk = backbone.stage_range(branch, attention_depth)
            copies = m if attention == "per_learner" else 1
            trunks = [
                nn.Sequential(*(copy.deepcopy(backbone.stages[s]) for s in trunk)) for _ in range(copies)
            ]
            # per learner: M trunks, their maps side by side into a grouped 1×1 conv (group m = learner m)
            self.attention_trunk = trunks[0] if copies == 1 else nn.ModuleList(trunks)
            self.attention_masks = nn.Conv2d(
                copies * backbone.stage_channels[attention_depth],
                m * backbone.stage_channels[branch],
                1,
                groups=copies,
            )
            self.head = nn.Linear(in_dim, part_dim)
        else:
            self.head_stages = nn.ModuleList(
                nn.Sequential(*(copy.deepcopy(backbone.stages[s]) for s in after)) for _ in range(m - 1)
            )
            self.heads = nn.ModuleList(nn.Linear(in_dim, part_dim) for _ in range(m))
        if init == "xavier":
            self._xavier_init()
        self.register_buffer("_self_sim_sum", torch.zeros(m, m), persistent=False)
        self.register_buffer("_self_sim_count", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def _xavier_init(self) -> None:
        """Glorot-uniform weights and zero biases for the embedding layers and each learner's 1×1 conv."""
        linears = [self.head] if self.variant == "attention" else list(self.heads)
        blocks = [lin.weight for lin in linears]
        if self.variant == "attention":
            blocks += list(self.attention_masks.weight.chunk(self.m))  # [C, C_att, 1, 1] views per learner
            nn.init.zeros_(self.attention_masks.bias)
        for w in blocks:
            nn.init.xavier_uniform_(w)
        for lin in linears:
            nn.init.zeros_(lin.bias)

    def train(self, mode: bool = True) -> ABE:
        super().train(mode)
        if mode and self.backbone.frozen_bn:
            _freeze_bn(self)
        return self

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """The final conv maps of the M learners, learner-major: [M·B, C, h, w]."""
        s = self.backbone(images, end=self.branch)
        if self.variant == "heads":
            g = self.backbone(s, start=self.branch)
            return torch.cat([g, *(stages(s) for stages in self.head_stages)])
        masks = self._masks(s)
        return self.backbone((s.unsqueeze(0) * masks).flatten(0, 1), start=self.branch)

    def _masks(self, s: torch.Tensor) -> torch.Tensor:
        """The M learners' sigmoid attention masks of S's output ``s`` [B, C, H, W]: [M, B, C, H, W]."""
        b, c, h, w = s.shape
        trunk = self.attention_trunk
        a = torch.cat([t(s) for t in trunk], 1) if isinstance(trunk, nn.ModuleList) else trunk(s)
        logits = self.attention_masks(a)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits).view(b, self.m, c, h, w).transpose(0, 1)

    def attention_maps(self, images: torch.Tensor) -> torch.Tensor | None:
        """Each learner's mask averaged over S's channels, [M, B, H, W] at S's resolution (the report draws
        them over the test images); None for the heads variant, which has no attention."""
        if self.variant != "attention":
            return None
        return self._masks(self.backbone(images, end=self.branch)).mean(2)

    def learner_columns(self) -> list[slice]:
        """Learner m's columns of the embedding, ``m·d : (m+1)·d`` (``plugins.Ensemble``; the run scores
        each alone); none for M = 1, whose embedding is its one learner's."""
        d = self.embedding_dim // self.m
        return [slice(i * d, (i + 1) * d) for i in range(self.m)] if self.m > 1 else []

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        b = images.shape[0]
        pooled = self.pooling(self._features(images), None if labels is None else labels.repeat(self.m))
        aux: dict[str, torch.Tensor] = {}
        if isinstance(pooled, ModelOutput):
            aux, pooled = dict(pooled.aux_losses), pooled.embeddings
        z = pooled.view(self.m, b, -1)
        if self.variant == "attention":
            e = self.head(z)
        else:
            e = torch.stack([head(zi) for head, zi in zip(self.heads, z, strict=True)])
        parts = F.normalize(e, dim=-1)  # [M, B, d]
        stats: dict[str, float | torch.Tensor] = {}
        if self.m > 1:
            div = divergence_loss(parts, self.m_div)
            stats["divergence_unweighted"] = div.detach()
            if self.lambda_div > 0:
                aux["divergence"] = self.lambda_div * div
            if self.training:
                self._record_self_similarity(parts.detach())
        return ModelOutput(
            embeddings=parts.transpose(0, 1).reshape(b, self.embedding_dim),
            aux_losses=aux,
            parts=list(parts.unbind(0)),
            stats=stats,
        )

    def _record_self_similarity(self, parts: torch.Tensor) -> None:
        f = parts.transpose(0, 1).float()  # [B, M, d]
        self._self_sim_sum += (f @ f.transpose(1, 2)).sum(0)
        self._self_sim_count += f.shape[0]

    def epoch_diagnostics(self) -> dict[str, Any]:
        """Mean cosine similarity between different learners' embeddings of the same training image (and the
        M×M matrix per learner pair) over this epoch's training batches; the accumulators are then reset."""
        if self.m < 2 or self._self_sim_count.item() == 0:
            return {}
        mean = self._self_sim_sum / self._self_sim_count
        i, j = torch.triu_indices(self.m, self.m, offset=1, device=mean.device)
        out = {
            "learner_self_similarity": float(mean[i, j].mean()),
            "learner_self_similarity_matrix": mean.cpu().tolist(),
        }
        self._self_sim_sum.zero_()
        self._self_sim_count.zero_()
        return out
