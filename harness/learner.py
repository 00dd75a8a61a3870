"""What one optimisation step needs, assembled from a run's config (``Learner``): the model, the metric
loss with its miner and synthesis, the regularizers and one optimizer over their parameter groups; and
``embed``, the model's embeddings of a whole split. Training, evaluation, offline mining and ``dmlh bench``
all use these, and ``check_assembly`` builds them once on the CPU so that a study fails at validation
rather than in every trial."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from harness.config import RunConfig, validate
from harness.data.prefetch import received_in_thread
from harness.errors import ConfigError
from harness.logs import progress_bar
from harness.model import build_component, build_model
from harness.monitor import embedding_stats
from harness.optim import decay_groups
from harness.plugins import HasBackbone, param_options
from harness.types import LossOutput, ModelOutput


def _detached(v: float | torch.Tensor) -> float | torch.Tensor:
    """A loss statistic as the history keeps it: a float32 tensor cut from the graph (no host read), or a
    plugin's float as it is."""
    return v.detach().float() if isinstance(v, torch.Tensor) else float(v)


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
    for x, y in progress_bar(received_in_thread(loader, device), desc=desc, leave=False):
        out: ModelOutput = model(x.to(device, non_blocking=True))
        embs.append(out.embeddings.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


def use_channels_last(model: nn.Module) -> None:
    """Put ``model``'s 4-D weights in the channels_last memory format, and every 4-D image batch it is
    called with (a forward pre-hook: training, evaluation and benchmarks alike), so that convolutions run
    in NHWC without a layout conversion per layer. The state_dict keys and values are unchanged."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_input)


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def _as_is(out: ModelOutput, labels: torch.Tensor) -> tuple[ModelOutput, torch.Tensor]:
    return out, labels


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
    #: The model's output of this process's shard → that of the global batch (``harness.distributed.Dist.
    #: global_batch``: gathered over the ranks of a DDP run); as it is in one process.
    global_batch: Callable[[ModelOutput, torch.Tensor], tuple[ModelOutput, torch.Tensor]] = field(
        default=_as_is, repr=False
    )
    #: Autocast dtype of the model's forward when ``amp`` is on (``train.amp_dtype``).
    amp_dtype: torch.dtype = torch.float16

    @classmethod
    def build(cls, cfg: RunConfig, num_classes: int, in_channels: int, device: torch.device) -> Learner:
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels).to(device)
        if cfg.train.channels_last:
            use_channels_last(model)
        if cfg.train.compile:  # in place and lazy: compiled at the first forward, state_dict keys unchanged
            model.compile(mode=cfg.train.compile)
        ctx = {"num_classes": num_classes, "embedding_dim": model.embedding_dim}
        miner = build_component(cfg.miner, "miner", "miner", **ctx) if cfg.miner else None
        synthesis = build_component(cfg.synthesis, "synthesis", "synthesis", **ctx) if cfg.synthesis else None
        loss = build_component(cfg.loss, "loss", "loss", miner=miner, synthesis=synthesis, **ctx).to(device)
        regularizers = nn.ModuleList(
            build_component(r, "regularizer", f"regularizers.{i}", **ctx)
            for i, r in enumerate(cfg.regularizers)
        ).to(device)
        groups = param_groups(model, [loss, regularizers], cfg)
        groups = decay_groups(groups, [model, loss, regularizers], str(cfg.optimizer.get("decay", "all")))
        optimizer = build_component(cfg.optimizer, "optimizer", "optimizer", params=groups)
        amp = cfg.train.amp and device.type == "cuda"
        amp_dtype = getattr(torch, cfg.train.amp_dtype)
        return cls(model, loss, regularizers, optimizer, amp=amp, miner=miner, amp_dtype=amp_dtype)

    @property
    def grad_scaling(self) -> bool:
        """Whether the backward pass needs a GradScaler: float16 autocast only (bfloat16 has float32's
        exponent range, so its gradients do not underflow)."""
        return self.amp and self.amp_dtype == torch.float16

    def objective(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Total loss of one batch (metric loss per model part + regularizers + model aux losses) and its
        components for the history: detached tensors (or a plugin's floats), never read back to the host
        here, so the step does not wait for the device (``monitor.StepStats`` reads them per interval)."""
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out: ModelOutput = self.model(images, labels)
        out, labels = self.global_batch(out, labels)  # the ranks' shards gathered (harness.distributed)
        parts = out.parts if out.parts is not None else [out.embeddings]
        metric_outputs: list[LossOutput] = [self.loss(p.float(), labels) for p in parts]
        total = cast(torch.Tensor, sum(o.value for o in metric_outputs))  # at least one part
        stats: dict[str, torch.Tensor | float] = {"loss/metric": _detached(total)}
        for o in metric_outputs:
            for k, v in o.stats.items():
                stats[f"loss/{k}"] = stats.get(f"loss/{k}", 0.0) + _detached(v) / len(metric_outputs)
        for i, reg in enumerate(self.regularizers):
            r = reg(out.embeddings.float(), labels)
            total = total + r.value
            stats[f"reg{i}/value"] = _detached(r.value)
            stats.update({f"reg{i}/{k}": _detached(v) for k, v in r.stats.items()})
        for name, value in out.aux_losses.items():
            total = total + value
            stats[f"aux/{name}"] = _detached(value)
        stats.update({f"model/{k}": _detached(v) for k, v in out.stats.items()})
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
