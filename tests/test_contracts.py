"""Contract tests generated from the registry: every registered component is built from its
defaults and run once (harness.testing holds the checks, reusable by plugin packages)."""

from __future__ import annotations

import pytest

from harness import registry
from harness.testing import CHECKED_KINDS, check_component

SLOW_BACKBONES = {"googlenet", "bn_inception", "resnet50"}

CASES = [
    pytest.param(kind, name, marks=[pytest.mark.slow] if name in SLOW_BACKBONES else [], id=f"{kind}:{name}")
    for kind in CHECKED_KINDS
    if kind in registry.kinds()
    for name in registry.registry(kind).names()
]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_component_contract(kind: str, name: str) -> None:
    check_component(kind, name)


def test_no_broken_builtin_plugins() -> None:
    assert registry.broken_plugins() == {}


@pytest.mark.parametrize(
    ("backbone", "params", "split"),
    [
        ("googlenet", {}, ("pool3", "inception4e")),
        ("bn_inception", {}, ("inception3c", "inception4d")),
        ("resnet50", {}, ("layer2", "layer3")),
        ("resnet50", {"last_stride": 1}, ("layer2", "layer3")),
        ("small_convnet", {}, ("block2", "block3")),
    ],
)
def test_abe_defaults_follow_from_declared_stage_facts(backbone: str, params: dict, split: tuple) -> None:
    """The ABE split each backbone used to declare (``abe_defaults``), now derived from its stage facts."""
    from methods.abe import default_split

    built = registry.build("backbone", backbone, context={"in_channels": 3}, **params)
    assert default_split(built) == split


def test_metric_names_are_the_ones_evaluate_computes() -> None:
    """Readers (train, study, report) use harness.types' names; evaluate returns exactly those keys."""
    import torch

    from harness.evaluate import retrieval_metrics
    from harness.types import METRICS, metric_title, recall_name

    emb, labels = torch.randn(12, 4), torch.arange(12) % 3
    metrics = retrieval_metrics(emb, labels, ks=(1, 2), backend="torch")
    assert set(metrics) == {recall_name(1), recall_name(2), *METRICS}
    assert [metric_title(m) for m in ("recall@2", "map@r", "nmi")] == ["Recall@2", "MAP@R", "NMI"]
