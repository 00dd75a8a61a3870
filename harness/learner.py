"""What one optimisation step needs, assembled from a run's config (``Learner``): the model, the metric
loss with its miner and synthesis, the regularizers and one optimizer over their parameter groups; and
``embed``, the model's embeddings of a whole split. Training, evaluation, offline mining and ``dmlh bench``
all use these, and ``check_assembly`` builds them once on the CPU so that a study fails at validation
rather than in every trial."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.config import RunConfig, validate
from harness.data.prefetch import received_in_thread
from harness.errors import ConfigError
from harness.model import build_component, build_model
from harness.monitor import embedding_stats
from harness.plugins import HasBackbone, param_options
from harness.types import LossOutput, ModelOutput


def as_float(v: float | torch.Tensor) -> float:
    """A loss statistic (float or tensor) as a Python float for the history."""
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def param_groups(model: nn.Module, loss_modules: Iterable[nn.Module], cfg: RunConfig) -> list[dict[str, Any]]:
    """Backbone / head / loss groups with their LR multipliers; a parameter's own ``lr_mult`` and
    ``no_weight_decay`` attributes (GeM p, proxies) give it a group of its own."""
    base_lr = float(cfg.optimizer.get("lr", 1e-3))
    base_wd = float(cfg.optimizer.get("weight_decay", 0.0))
    backbone_ids = {id(p) for p in model.backbone.parameters()} if isinstance(model, HasBackbone) else set()
    groups: dict[tuple[str, float, bool], list[nn.Parameter]] = defaultdict(list)
    mults = {
        "backbone": cfg.train.backbone_lr_mult,
        "head": cfg.train.head_lr_mult,
        "loss": cfg.train.loss_lr_mult,
    }
    sources = [("model", model)] + [("loss", m) for m in loss_modules]
    seen: set[int] = set()
    for source, module in sources:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            group = "loss" if source == "loss" else ("backbone" if id(p) in backbone_ids else "head")
            key = (group, *param_options(p))
            groups[key].append(p)
    return [
        {
            "params": ps,
            "lr": base_lr * mults[g] * mult,
            "weight_decay": 0.0 if no_wd else base_wd,
            "name": f"{g}" + (f"×{mult:g}" if mult != 1.0 else "") + ("/no_wd" if no_wd else ""),
        }
        for (g, mult, no_wd), ps in groups.items()
    ]


@torch.no_grad()
def embed(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    desc: str = "embed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, CPU) and labels of a whole split, in order."""
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    embs, labels = [], []
    for x, y in tqdm(received_in_thread(loader, device), desc=desc, leave=False, disable=None):
        out: ModelOutput = model(x.to(device, non_blocking=True))
        embs.append(out.embeddings.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


@dataclass
class Learner:
    """What one optimisation step needs, assembled from the config: the model, the metric loss (with its
    miner and synthesis), the regularizers and one optimizer over all their parameters. Training and
    ``dmlh bench methods`` both step through ``objective`` so the benchmark times the real thing."""

    model: nn.Module
    loss: nn.Module
    regularizers: nn.ModuleList
    optimizer: torch.optim.Optimizer
    amp: bool
    #: The loss's miner (also reachable as ``loss.miner``): the trainer asks an offline one to mine the split.
    miner: nn.Module | None = None

    @classmethod
    def build(cls, cfg: RunConfig, num_classes: int, in_channels: int, device: torch.device) -> Learner:
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels).to(device)
        ctx = {"num_classes": num_classes, "embedding_dim": model.embedding_dim}
        miner = build_component(cfg.miner, "miner", "miner", **ctx) if cfg.miner else None
        synthesis = build_component(cfg.synthesis, "synthesis", "synthesis", **ctx) if cfg.synthesis else None
        loss = build_component(cfg.loss, "loss", "loss", miner=miner, synthesis=synthesis, **ctx).to(device)
        regularizers = nn.ModuleList(
            build_component(r, "regularizer", f"regularizers.{i}", **ctx)
            for i, r in enumerate(cfg.regularizers)
        ).to(device)
        groups = param_groups(model, [loss, regularizers], cfg)
        optimizer = build_component(cfg.optimizer, "optimizer", "optimizer", params=groups)
        amp = cfg.train.amp and device.type == "cuda"
        return cls(model, loss, regularizers, optimizer, amp=amp, miner=miner)

    def objective(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one batch (metric loss per model part + regularizers + model aux losses) and its
        components as scalars for the history."""
        with torch.autocast(images.device.type, enabled=self.amp):
            out: ModelOutput = self.model(images, labels)
        parts = out.parts if out.parts is not None else [out.embeddings]
        metric_outputs: list[LossOutput] = [self.loss(p.float(), labels) for p in parts]
        total = cast(torch.Tensor, sum(o.value for o in metric_outputs))  # at least one part
        stats: dict[str, float] = {"loss/metric": as_float(total)}
        for o in metric_outputs:
            for k, v in o.stats.items():
                stats[f"loss/{k}"] = stats.get(f"loss/{k}", 0.0) + as_float(v) / len(metric_outputs)
        for i, reg in enumerate(self.regularizers):
            r = reg(out.embeddings.float(), labels)
            total = total + r.value
            stats[f"reg{i}/value"] = as_float(r.value)
            stats.update({f"reg{i}/{k}": as_float(v) for k, v in r.stats.items()})
        for name, value in out.aux_losses.items():
            total = total + value
            stats[f"aux/{name}"] = as_float(value)
        stats.update({f"model/{k}": as_float(v) for k, v in out.stats.items()})
        stats.update(embedding_stats(out.embeddings, labels))  # collapse shows here first
        return total, stats


#: The config sections ``Learner.build`` reads: configs equal in these assemble alike (built once). The
#: sampler is among them because ``config.validate`` checks an offline miner against its kind.
_ASSEMBLED = (
    "sampler",
    "backbone",
    "pooling",
    "model",
    "loss",
    "miner",
    "synthesis",
    "regularizers",
    "optimizer",
    "train",
)


def check_assembly(cfg: RunConfig) -> list[str]:
    """Problems only assembling the components shows (a stage name, a component combination): the model,
    loss, regularizers and optimizer are built on the CPU without weights, so that a study fails at
    validation rather than in every trial of an arm."""
    raw = cfg.to_dict()
    if "pretrained" in raw["backbone"]:
        raw["backbone"]["pretrained"] = False
    return list(_assemble(json.dumps({k: raw[k] for k in _ASSEMBLED}, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _assemble(sections: str) -> tuple[str, ...]:
    try:
        cfg = validate(json.loads(sections))
        Learner.build(cfg, num_classes=4, in_channels=3, device=torch.device("cpu"))
    except ConfigError as e:
        return tuple(e.problems)
    return ()
