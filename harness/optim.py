"""Optimizers and learning-rate schedules (registered kinds ``optimizer`` and ``scheduler``).

An optimizer factory takes the parameter groups built by the engine (backbone / head / loss, each
with its learning-rate multiplier; a parameter may carry ``lr_mult`` and ``no_weight_decay``
attributes, e.g. GeM's p or Proxy-Anchor's proxies). Schedulers are stepped once per epoch.

Which parameters weight decay applies to is every optimizer's ``decay`` parameter, applied by the engine
(``decay_groups``, which knows the modules): ``all`` (the default), ``no_bn`` (every parameter but those of
normalisation layers: the official symmetrical-synthesis code's ``5e-3·Σ‖w‖²/2`` over non-BN variables) or
``no_bn_no_bias`` (also no bias).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from harness.registry import register

ParamGroups = list[dict[str, Any]]
Decay = Literal["all", "no_bn", "no_bn_no_bias"]
#: Normalisation layers whose affine parameters ``decay: no_bn`` leaves undecayed.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def undecayed(modules: Iterable[nn.Module], decay: str) -> set[int]:
    """Ids of the parameters of ``modules`` that rule ``decay`` exempts from weight decay."""
    assert decay in ("all", "no_bn", "no_bn_no_bias"), f"unknown decay rule {decay!r}"
    out: set[int] = set()
    if decay == "all":
        return out
    for root in modules:
        for module in root.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, NORM_LAYERS) or (decay == "no_bn_no_bias" and name == "bias"):
                    out.add(id(p))
    return out


def decay_groups(groups: ParamGroups, modules: Iterable[nn.Module], decay: str) -> ParamGroups:
    """``groups`` with the parameters that rule ``decay`` exempts moved to groups of their own without
    weight decay (named ``<group>/no_wd``); the same groups where nothing is exempt."""
    exempt = undecayed(modules, decay)
    if not exempt:
        return groups
    out = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in exempt]
        free = [p for p in g["params"] if id(p) in exempt]
        if keep:
            out.append({**g, "params": keep})
        if free:
            name = str(g.get("name", "group"))
            name = name.removesuffix("/no_wd") + "/no_wd"
            out.append({**g, "params": free, "weight_decay": 0.0, "name": name})
    return out


@register("optimizer", "adam")
def adam(
    *,
    params: ParamGroups,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """Adam (weight decay as L2 in the gradient, as the DML papers' code does); ``decay``: which
    parameters weight decay applies to (see the module docstring; the engine applies it)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)


@register("optimizer", "adamw")
def adamw(
    *,
    params: ParamGroups,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; Proxy-Anchor's optimizer); ``decay`` as Adam's."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


@register("optimizer", "sgd")
def sgd(
    *,
    params: ParamGroups,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """SGD with momentum; ``decay`` as Adam's."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)


@register("optimizer", "rmsprop")
def rmsprop(
    *,
    params: ParamGroups,
    lr: float = 1e-6,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    alpha: float = 0.99,
    eps: float = 1e-8,
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """RMSprop (torch's: the square root of the squared-gradient average before ``eps``); the defaults are
    A Metric Learning Reality Check's (lr 1e-6, momentum 0.9, weight decay 1e-4); ``decay`` as Adam's."""
    return torch.optim.RMSprop(
        params, lr=lr, weight_decay=weight_decay, momentum=momentum, alpha=alpha, eps=eps
    )


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
