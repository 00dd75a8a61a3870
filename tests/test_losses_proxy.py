"""Proxy-NCA, Proxy-Anchor and normalized softmax: naive per-sample loops from the formulas,
pytorch-metric-learning parity (with copied proxies), gradcheck over embeddings and proxies, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses
from torch.func import functional_call

from harness import registry
from methods.losses.proxy import ProxyAnchorLoss, ProxyNCALoss
from methods.losses.softmax import NormalizedSoftmaxLoss

C, D = 6, 5
LABELS = torch.tensor([0, 2, 2, 5, 0, 3, 2])  # classes 1 and 4 absent, class 3 and 5 with one image


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _naive_proxy_nca(x, proxies, labels, scale: float, exclusive: bool) -> torch.Tensor:
    total = 0
    for i in range(len(labels)):
        d = [((_unit(x[i]) - _unit(proxies[z])) ** 2).sum() for z in range(len(proxies))]
        y = int(labels[i])
        denom = sum(torch.exp(-scale * d[z]) for z in range(len(proxies)) if not (exclusive and z == y))
        total = total - torch.log(torch.exp(-scale * d[y]) / denom)
    return total / len(labels)


def _naive_proxy_anchor(x, proxies, labels, alpha: float, delta: float) -> torch.Tensor:
    pos, neg, present = 0, 0, 0
    for c in range(len(proxies)):
        sims = [_unit(x[i]) @ _unit(proxies[c]) for i in range(len(labels))]
        members = [i for i in range(len(labels)) if labels[i] == c]
        if members:
            present += 1
            pos = pos + torch.log(1 + sum(torch.exp(-alpha * (sims[i] - delta)) for i in members))
        neg = neg + torch.log(
            1 + sum(torch.exp(alpha * (sims[i] + delta)) for i in range(len(labels)) if i not in members)
        )
    return pos / present + neg / len(proxies)


def _naive_norm_softmax(x, weight, labels, temperature: float) -> torch.Tensor:
    total = 0
    for i in range(len(labels)):
        logits = torch.stack([_unit(x[i]) @ _unit(w) / temperature for w in weight])
        total = total - torch.log_softmax(logits, 0)[labels[i]]
    return total / len(labels)


@pytest.mark.parametrize("variant", ["paper_exclusive", "softmax_inclusive"])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_proxy_nca_matches_naive_loop(variant: str, scale: float) -> None:
    loss = ProxyNCALoss(variant=variant, scale=scale, num_classes=C, embedding_dim=D).double()
    x = torch.randn(len(LABELS), D, dtype=torch.float64)
    want = _naive_proxy_nca(x, loss.proxies.detach(), LABELS, scale, variant == "paper_exclusive")
    torch.testing.assert_close(loss(x, LABELS).value, want)


def test_proxy_nca_inclusive_matches_pml() -> None:
    loss = ProxyNCALoss(variant="softmax_inclusive", scale=3.0, num_classes=C, embedding_dim=D)
    pml = losses.ProxyNCALoss(num_classes=C, embedding_size=D, softmax_scale=3.0)
    pml.proxies.data.copy_(loss.proxies.data)
    x = torch.randn(len(LABELS), D)
    torch.testing.assert_close(loss(x, LABELS).value, pml(x, LABELS))


def test_proxy_nca_paper_form_can_be_negative() -> None:
    loss = ProxyNCALoss(num_classes=C, embedding_dim=D)
    x = loss.proxies.detach()[LABELS] * 5  # each embedding on its own proxy
    assert loss(x, LABELS).value < 0


def test_proxy_anchor_matches_naive_loop_and_pml() -> None:
    loss = ProxyAnchorLoss(num_classes=C, embedding_dim=D)
    x = torch.randn(len(LABELS), D, dtype=torch.float64)
    want = _naive_proxy_anchor(x, loss.proxies.detach().double(), LABELS, 32.0, 0.1)
    torch.testing.assert_close(loss(x, LABELS).value.double(), want, rtol=1e-5, atol=1e-5)
    pml = losses.ProxyAnchorLoss(num_classes=C, embedding_size=D, margin=0.1, alpha=32)
    pml.proxies.data.copy_(loss.proxies.data)
    xf = x.float()
    torch.testing.assert_close(loss(xf, LABELS).value, pml(xf, LABELS))


def test_proxy_anchor_defaults_init_and_lr_mult() -> None:
    loss = registry.build("loss", "proxy_anchor", context={"num_classes": 2000, "embedding_dim": 64})
    assert (loss.alpha, loss.delta) == (32.0, 0.1)
    assert loss.proxies.lr_mult == 100.0 and not getattr(loss.proxies, "no_weight_decay", False)
    # kaiming_normal_(mode="fan_out") on a [C, D] tensor: std = sqrt(2 / C)
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.05)
    nca = registry.build("loss", "proxy_nca", context={"num_classes": 3, "embedding_dim": 4})
    assert nca.proxies.lr_mult == 1.0 and nca.variant == "paper_exclusive"
    soft = registry.build(
        "loss", "normalized_softmax", {"num_classes": 3, "embedding_dim": 4}, weight_lr_mult=10.0
    )
    assert soft.weight.lr_mult == 10.0 and soft.temperature == 0.05


def test_proxy_anchor_large_alpha_approaches_hinge() -> None:
    # α → ∞: (1/α)·log(1 + Σ e^{α z}) → max(0, max z), so loss/α becomes a hinge on the margins
    alpha = 1e4
    loss = ProxyAnchorLoss(alpha=alpha, num_classes=C, embedding_dim=D).double()
    x = torch.randn(len(LABELS), D, dtype=torch.float64)
    cos = (
        torch.nn.functional.normalize(x, dim=1)
        @ torch.nn.functional.normalize(loss.proxies.detach(), dim=1).T
    )
    pos = torch.nn.functional.one_hot(LABELS, C).bool()
    hinge_pos = sum((0.1 - cos[:, c][pos[:, c]]).max().clamp_min(0) for c in range(C) if pos[:, c].any())
    hinge_neg = sum((cos[:, c][~pos[:, c]] + 0.1).max().clamp_min(0) for c in range(C))
    want = hinge_pos / int(pos.any(0).sum()) + hinge_neg / C
    torch.testing.assert_close(loss(x, LABELS).value / alpha, want, rtol=1e-3, atol=1e-3)


def test_normalized_softmax_matches_naive_loop_and_pml() -> None:
    loss = NormalizedSoftmaxLoss(num_classes=C, embedding_dim=D)
    x = torch.randn(len(LABELS), D, dtype=torch.float64)
    want = _naive_norm_softmax(x, loss.weight.detach().double(), LABELS, 0.05)
    torch.testing.assert_close(loss.double()(x, LABELS).value, want)
    pml = losses.NormalizedSoftmaxLoss(num_classes=C, embedding_size=D, temperature=0.05)
    pml.W.data.copy_(loss.weight.data.T.float())
    xf = x.float()
    torch.testing.assert_close(loss.float()(xf, LABELS).value, pml(xf, LABELS))


LOSSES = {
    "proxy_nca_paper": lambda: ProxyNCALoss(scale=4.0, num_classes=C, embedding_dim=D),
    "proxy_nca_inclusive": lambda: ProxyNCALoss(variant="softmax_inclusive", num_classes=C, embedding_dim=D),
    "proxy_anchor": lambda: ProxyAnchorLoss(alpha=4.0, num_classes=C, embedding_dim=D),
    "normalized_softmax": lambda: NormalizedSoftmaxLoss(temperature=0.5, num_classes=C, embedding_dim=D),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_embeddings_and_proxies(name: str) -> None:
    loss = LOSSES[name]().double()
    ((pname, param),) = loss.named_parameters()
    x = torch.randn(len(LABELS), D, dtype=torch.float64, requires_grad=True)
    w = param.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, p: functional_call(loss, {pname: p}, (e, LABELS)).value, (x, w))


@pytest.mark.parametrize("name", list(LOSSES))
def test_singleton_classes_and_bf16_autocast(name: str) -> None:
    loss = LOSSES[name]()
    x = torch.randn(4, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, torch.tensor([0, 1, 3, 5]))  # no positive pair anywhere
    out.value.backward()
    assert torch.isfinite(out.value) and torch.isfinite(x.grad).all()
    (param,) = loss.parameters()
    assert param.grad is not None and torch.isfinite(param.grad).all()
    torch.testing.assert_close(
        out.value.float(), loss(x, torch.tensor([0, 1, 3, 5])).value, rtol=0.05, atol=0.05
    )


def test_paper_variant_needs_two_classes() -> None:
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2 classes"):
        ProxyNCALoss(num_classes=1, embedding_dim=D)
