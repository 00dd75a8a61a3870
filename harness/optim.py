"""Optimizers and learning-rate schedules (registered kinds ``optimizer`` and ``scheduler``).

An optimizer factory takes the parameter groups built by the engine (backbone / head / loss, each
with its learning-rate multiplier; a parameter may carry ``lr_mult`` and ``no_weight_decay``
attributes, e.g. GeM's p or Proxy-Anchor's proxies). Schedulers are stepped once per epoch.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.registry import register

ParamGroups = list[dict[str, Any]]


@register("optimizer", "adam")
def adam(
    *,
    params: ParamGroups,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Adam (weight decay as L2 in the gradient, as the DML papers' code does)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)


@register("optimizer", "adamw")
def adamw(
    *,
    params: ParamGroups,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; Proxy-Anchor's optimizer)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


@register("optimizer", "sgd")
def sgd(
    *,
    params: ParamGroups,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with momentum."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)


@register("scheduler", "step")
def step(*, optimizer: torch.optim.Optimizer, step_size: int = 10, gamma: float = 0.5) -> Any:
    """Multiply the learning rate by gamma every step_size epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


@register("scheduler", "multistep")
def multistep(
    *,
    optimizer: torch.optim.Optimizer,
    milestones: list[int] = [40, 60, 80],  # noqa: B006
    gamma: float = 0.2,
) -> Any:
    """Multiply the learning rate by gamma at each milestone epoch (MDR: 40/60/80, ×0.2)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


@register("scheduler", "cosine")
def cosine(*, optimizer: torch.optim.Optimizer, epochs: int, min_lr_ratio: float = 0.0) -> Any:
    """Cosine annealing over the run's epochs down to min_lr_ratio × the initial learning rate."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(epochs, 1), eta_min=base * min_lr_ratio
    )


@register("scheduler", "exponential")
def exponential(*, optimizer: torch.optim.Optimizer, gamma: float = 0.99) -> Any:
    """Multiply the learning rate by gamma every epoch (cirtorch uses exp(-0.01))."""
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
