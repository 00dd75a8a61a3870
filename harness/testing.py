"""Reusable contract checks: every registered component, built from its defaults, runs once.

The built-ins are checked by ``tests/test_contracts.py`` (parametrised over the registry); a
third-party plugin package can call the same functions in its own tests::

    from harness.testing import check_component, check_plugin
    check_component("loss", "my_loss")      # one component
    check_plugin("my_methods")              # everything its dmlh.plugins entry point registered
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from harness import plugins, registry
from harness.types import LossOutput, ModelOutput

#: Kinds with a generic contract check (datasets, optimizers and schedulers are covered elsewhere).
CHECKED_KINDS = ("backbone", "pooling", "model", "loss", "miner", "regularizer", "synthesis", "whitening")


def pk_labels(p: int = 4, k: int = 4) -> torch.Tensor:
    """Labels of a P×K batch: P classes, K consecutive images each."""
    return torch.arange(p).repeat_interleave(k)


def _context(dim: int, num_classes: int) -> dict[str, Any]:
    return {
        "num_classes": num_classes,
        "embedding_dim": dim,
        "in_channels": 8,
        "miner": None,
        "synthesis": None,
    }


def _build(kind: str, name: str, **context: Any) -> Any:
    return registry.build(kind, name, context=context, path=f"{kind}:{name}")


def _check_finite_scalar(out: LossOutput, what: str) -> None:
    assert isinstance(out, LossOutput), f"{what} must return a LossOutput, got {type(out).__name__}"
    assert out.value.dim() == 0, f"{what}: value must be a scalar tensor"
    assert torch.isfinite(out.value), f"{what}: value is not finite ({out.value})"
    for k, v in out.stats.items():
        assert isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1), (
            f"{what}: stat {k!r} must be a scalar"
        )


def check_loss_like(kind: str, name: str, dim: int = 16) -> None:
    """A loss / regularizer: finite scalar on a P×K batch with a gradient; finite on a batch without
    positive pairs (then no NaN gradient)."""
    labels = pk_labels()
    module = _build(kind, name, **_context(dim, num_classes=int(labels.max()) + 1))
    module.train()
    emb = torch.nn.functional.normalize(torch.randn(len(labels), dim), dim=1).requires_grad_(True)
    out = module(emb, labels)
    _check_finite_scalar(out, f"{kind} {name}")
    out.value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all(), f"{kind} {name}: bad gradient"
    singles = torch.arange(4)  # every class once: no positive pair anywhere
    emb2 = torch.randn(4, dim, requires_grad=True)
    out2 = module(emb2, singles)
    _check_finite_scalar(out2, f"{kind} {name} (no positive pairs)")
    if out2.value.requires_grad:
        out2.value.backward()
        assert emb2.grad is None or torch.isfinite(emb2.grad).all(), f"{kind} {name}: NaN gradient"


def check_split_miner(miner: plugins.SplitMiner, name: str, dim: int = 16) -> torch.Tensor:
    """An offline miner mines valid triplets from a split; returns the labels of a batch laid out as the
    ``sampler.kind: triplets`` sampler lays out its triplets (3 consecutive images each)."""
    labels = pk_labels(6, 5)
    emb = torch.randn(len(labels), dim)
    triplets, stats = miner.mine_split(emb, labels, np.random.default_rng(0))
    assert triplets.ndim == 2 and triplets.shape[1] == 3, f"miner {name}: mine_split must return [T, 3]"
    a, p, n = (torch.as_tensor(triplets[:, i]) for i in range(3))
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert all(isinstance(v, float) for v in stats.values()), f"miner {name}: statistics must be floats"
    assert miner.refresh_every >= 1
    return labels[torch.as_tensor(triplets[:8]).reshape(-1)]


def check_miner(name: str, dim: int = 16) -> None:
    """A miner returns index tensors of its declared kind, pointing at valid positives/negatives; an offline
    miner (``plugins.SplitMiner``) also mines a split, and its batches are that sampler's."""
    labels = pk_labels()
    miner = _build("miner", name, **_context(dim, num_classes=4))
    produces = plugins.produces(type(miner))
    assert produces in ("pairs", "triplets"), f"miner {name}: class attribute produces must be pairs|triplets"
    if isinstance(miner, plugins.SplitMiner):
        labels = check_split_miner(miner, name, dim)
    idx = miner(torch.nn.functional.normalize(torch.randn(len(labels), dim), dim=1), labels)
    if produces == "triplets":
        a, p, n = idx
        assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    else:
        a1, p, a2, n = idx
        assert (labels[a1] == labels[p]).all() and (a1 != p).all() and (labels[a2] != labels[n]).all()


def check_backbone(name: str) -> None:
    """A backbone is a StagedBackbone whose stage-by-stage forward equals its full forward and whose
    declared stage channels and reductions match the tensors."""
    from harness.model import StagedBackbone

    backbone = _build("backbone", name, in_channels=3)
    assert isinstance(backbone, StagedBackbone), f"backbone {name} must subclass StagedBackbone"
    backbone.eval()
    size = backbone.data_config.input_size
    x = torch.randn(1, backbone.data_config.in_channels, size, size)
    with torch.no_grad():
        h, prev = x, None
        for stage in backbone.stage_names:
            h = backbone(h, start=prev, end=stage)
            assert h.shape[1] == backbone.stage_channels[stage], f"{name}.{stage}: channels {h.shape[1]}"
            side = -(-size // backbone.stage_reductions[stage])
            assert h.shape[-1] == side, f"{name}.{stage}: side {h.shape[-1]}, declared reduction gives {side}"
            prev = stage
        assert torch.allclose(h, backbone(x), atol=1e-5), f"backbone {name}: staged forward differs"


def check_pooling(name: str) -> None:
    pool = _build("pooling", name, in_channels=8, num_classes=3)
    pool.eval()
    out = pool(torch.rand(2, 8, 5, 5))
    out = out.embeddings if isinstance(out, ModelOutput) else out
    assert out.shape == (2, pool.out_dim), f"pooling {name}: shape {tuple(out.shape)} != (2, {pool.out_dim})"


def check_model(name: str) -> None:
    """A model built on the small convnet maps images to ModelOutput with embedding_dim columns."""
    backbone = _build("backbone", "small_convnet", in_channels=1)
    pooling = _build("pooling", "avg", in_channels=backbone.out_channels)
    model = registry.build(
        "model",
        name,
        context={"backbone": backbone, "pooling": pooling, "num_classes": 4},
        path=f"model:{name}",
    )
    model.train()
    labels = pk_labels(4, 2)
    out = model(torch.randn(len(labels), 1, 28, 28), labels)
    assert isinstance(out, ModelOutput)
    assert out.embeddings.shape == (len(labels), model.embedding_dim)
    assert all(torch.isfinite(v) for v in out.aux_losses.values())


def check_synthesis(name: str) -> None:
    synth = _build("synthesis", name, **_context(8, 4))
    assert isinstance(synth, nn.Module), f"synthesis {name} must be an nn.Module"


def check_whitening(name: str) -> None:
    """Whitening fits on embeddings (and labels) and maps them to the same number of rows."""
    emb, labels = torch.randn(64, 8), pk_labels(8, 8)
    w = _build("whitening", name).fit(emb, labels)
    out = w(emb[:5])
    assert out.shape[0] == 5 and torch.isfinite(out).all()


_CHECKS: dict[str, Callable[[str], None]] = {
    "backbone": check_backbone,
    "pooling": check_pooling,
    "model": check_model,
    "loss": lambda name: check_loss_like("loss", name),
    "regularizer": lambda name: check_loss_like("regularizer", name),
    "miner": check_miner,
    "synthesis": check_synthesis,
    "whitening": check_whitening,
}


def check_component(kind: str, name: str) -> None:
    """Run the contract check of ``kind`` on the registered component ``name``: it builds (``dmlh list`` and
    config validation would refuse it otherwise), uses no deprecated harness interface, and runs."""
    problem = registry.build_problem(kind, name)
    assert problem is None, problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _CHECKS[kind](name)
    old = plugins.InterfaceDeprecationWarning
    deprecated = [str(w.message) for w in caught if issubclass(w.category, old)]
    assert not deprecated, f"{kind} {name} uses a deprecated dml-harness interface: {'; '.join(deprecated)}"


def plugin_components(plugin: str) -> list[tuple[str, str]]:
    """``(kind, name)`` of every component with a contract check that ``plugin`` registered: its
    ``dmlh.plugins`` entry-point name, or the module (prefix) its classes live in."""
    out = []
    for kind in CHECKED_KINDS:
        for entry in registry.registry(kind).entries():
            module = str(getattr(entry.obj, "__module__", ""))
            if plugin in (entry.plugin, module) or module.startswith(plugin + "."):
                out.append((kind, entry.name))
    return out


def check_plugin(plugin: str) -> None:
    """Every contract check on a plugin package, for its own test suite::

        from harness.testing import check_plugin

        def test_dml_harness_contracts():
            check_plugin("my_methods")   # the entry-point name in [project.entry-points."dmlh.plugins"]

    Fails when the plugin failed to load, registered nothing, or any of its components fails its check
    (``check_component``); ``plugin_components`` gives the cases for one pytest parameter each."""
    broken = {k: v for k, v in registry.broken_plugins().items() if k == plugin or k.startswith(plugin + ".")}
    assert not broken, f"plugin {plugin} failed to load: {broken}"
    cases = plugin_components(plugin)
    assert cases, f"plugin {plugin} registered no component with a check ({', '.join(CHECKED_KINDS)})"
    for kind, name in cases:
        check_component(kind, name)
