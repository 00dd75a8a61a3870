"""Margin loss (Wu et al. 2017 / MultiGrain), distance-weighted sampling vs PML, GeM p_test, the CE head."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from harness import registry
from harness.plugins import param_options
from methods.distances import label_masks
from methods.miners import all_triplets

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])


def margin(**params: object) -> torch.nn.Module:
    ctx = {"num_classes": 4, "miner": params.pop("miner", None)}
    return registry.build("loss", "margin", context=ctx, path="loss", **params)


def naive_margin(emb: torch.Tensor, labels: torch.Tensor, beta: torch.Tensor, alpha: float, nu: float):
    """The formula over an explicit triplet loop (all triplets), MultiGrain's normalisation."""
    x = F.normalize(emb, dim=1)
    total, nonzero, betas = emb.new_zeros(()), 0, []
    for a in range(len(labels)):
        for p in range(len(labels)):
            for n in range(len(labels)):
                if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
                    continue
                b = beta[labels[a]] if len(beta) > 1 else beta[0]
                pos = F.relu((x[a] - x[p]).norm() - b + alpha)
                neg = F.relu(b - (x[a] - x[n]).norm() + alpha)
                total = total + pos + neg
                nonzero += int(pos > 0) + int(neg > 0)
                betas.append(b)
    divisor = max(nonzero, 1)
    reg = torch.stack(betas).sum() / divisor if len(beta) > 1 else beta[0]
    return total / divisor + nu * reg


@pytest.mark.parametrize(
    ("per_class", "nu", "alpha"), [(False, 0.0, 0.2), (True, 0.0, 0.2), (True, 0.1, 0.5)]
)
def test_margin_loss_equals_a_naive_loop_and_pml(per_class: bool, nu: float, alpha: float) -> None:
    torch.manual_seed(0)
    emb = torch.randn(len(LABELS), 6)
    loss = margin(per_class_beta=per_class, nu=nu, margin=alpha)
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.3, len(loss.beta)))
    ours = emb.clone().requires_grad_()
    value = loss(ours, LABELS).value
    value.backward()
    ref_emb = emb.clone().requires_grad_()
    naive = naive_margin(ref_emb, LABELS, loss.beta.detach(), alpha, nu)
    naive.backward()
    torch.testing.assert_close(value, naive)
    torch.testing.assert_close(ours.grad, ref_emb.grad)

    pml = pml_losses.MarginLoss(
        margin=alpha, nu=nu, beta=1.0, learn_beta=True, num_classes=4 if per_class else None
    )
    with torch.no_grad():
        pml.beta.copy_(loss.beta.detach())
    pml_emb = emb.clone().requires_grad_()
    pml_value = pml(pml_emb, LABELS)
    pml_value.backward()
    torch.testing.assert_close(value, pml_value)
    torch.testing.assert_close(ours.grad, pml_emb.grad)
    torch.testing.assert_close(loss.beta.grad, pml.beta.grad)


def test_beta_is_learnable_shared_or_per_class_with_its_own_lr() -> None:
    shared, per_class = margin(beta_lr_mult=10.0), margin(per_class_beta=True)
    assert shared.beta.shape == (1,) and per_class.beta.shape == (4,)
    assert param_options(shared.beta) == (10.0, True)
    fixed = margin(learn_beta=False, beta=0.6)
    assert not fixed.beta.requires_grad and fixed.beta.item() == pytest.approx(0.6)
    emb = torch.randn(len(LABELS), 6)
    per_class(emb, LABELS).value.backward()
    assert per_class.beta.grad is not None and torch.count_nonzero(per_class.beta.grad) == 4


def test_margin_takes_mined_triplets_and_handles_none() -> None:
    dw = registry.build("miner", "distance_weighted", path="miner")
    loss = margin(miner=dw)
    out = loss(torch.randn(len(LABELS), 6), LABELS)
    assert out.stats["triplets"] == sum(
        int((LABELS == c).sum()) * (int((LABELS == c).sum()) - 1) for c in range(4)
    )
    empty = loss(torch.randn(3, 6), torch.zeros(3, dtype=torch.long))  # no negatives: no triplet
    assert empty.value.item() == 0.0 and torch.isfinite(empty.value)


def test_distance_weighted_sampling_matches_pml_statistically() -> None:
    """Per anchor, the frequencies of sampled negatives agree with PML's DistanceWeightedMiner (both draw
    from the same distribution; PML draws one negative per random positive, we per ordered pair)."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    emb = F.normalize(torch.randn(16, 3), dim=1)  # low dim: the weights are far from uniform
    ours = registry.build("miner", "distance_weighted", path="miner")
    ref = pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    draws = 300
    counts = {"ours": torch.zeros(16, 16), "pml": torch.zeros(16, 16)}
    for _ in range(draws):
        for name, miner in (("ours", ours), ("pml", ref)):
            a, _, n = miner(emb, labels)
            counts[name].index_put_((a, n), torch.ones(len(a)), accumulate=True)
    freq = {k: v / v.sum(1, keepdim=True) for k, v in counts.items()}
    assert (freq["ours"][labels[:, None] == labels[None, :]] == 0).all()
    torch.testing.assert_close(freq["ours"], freq["pml"], atol=0.05, rtol=0)
    assert freq["ours"].max() > 2 / 12  # not uniform over the 12 negatives: the test can tell them apart


def test_gem_p_test_replaces_p_in_eval_mode_only() -> None:
    gem = registry.build("pooling", "gem", context={"in_channels": 4}, path="pooling", p=3.0, p_test=6.0)
    x = torch.rand(2, 4, 5, 5) + 0.1

    def naive(p: float) -> torch.Tensor:
        return x.pow(p).mean(dim=(2, 3)).pow(1 / p)

    torch.testing.assert_close(gem.train()(x), naive(3.0))
    torch.testing.assert_close(gem.eval()(x), naive(6.0))
    plain = registry.build("pooling", "gem", context={"in_channels": 4}, path="pooling")
    torch.testing.assert_close(plain.eval()(x), naive(3.0))
    assert registry.validate_params("pooling", "gem", {"p_test": 0}, "pooling")


def test_classification_head_is_weighted_cross_entropy_of_a_linear_classifier() -> None:
    ctx = {"num_classes": 4, "embedding_dim": 6}
    head = registry.build("regularizer", "classification", context=ctx, path="regularizers.0", weight=0.5)
    emb = torch.randn(len(LABELS), 6)
    out = head(emb, LABELS)
    logits = emb @ head.classifier.weight.T + head.classifier.bias
    naive = -sum(logits[i].log_softmax(0)[LABELS[i]] for i in range(len(LABELS))) / len(LABELS)
    torch.testing.assert_close(out.value, 0.5 * naive)
    assert math.isclose(out.stats["accuracy"].item(), (logits.argmax(1) == LABELS).float().mean().item())


def test_per_anchor_distinct_draws_give_each_anchor_distinct_negatives() -> None:
    """MultiGrain's sampling: the pairs are every ordered positive pair, an anchor's negatives differ."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    miner = registry.build("miner", "distance_weighted", path="miner", draws="per_anchor_distinct")
    for _ in range(20):
        a, p, n = miner(torch.randn(12, 8) * 0.3 + 1, labels)  # every negative within the 1.4 cutoff
        assert len(a) == 12 * 2 and (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
        for anchor in range(12):
            assert len(set(n[a == anchor].tolist())) == 2
    few = torch.tensor([0, 0, 0, 1])  # anchors of class 0 have 2 positives but a single negative
    a, _, n = miner(torch.randn(4, 8), few)
    assert len(a) == 6 and (n == 3).all()


def per_triplet_margin(loss: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, triplets: Any) -> Any:
    """The implementation the margin loss had before issue #30: two gathered rows per triplet."""
    x = F.normalize(emb, dim=1)
    a, p, n = all_triplets(*label_masks(labels)) if triplets is None else triplets
    beta = loss.beta[labels[a]] if len(loss.beta) > 1 else loss.beta.expand(len(a))
    d_ap, d_an = ((x[a] - x[b]).pow(2).sum(1).clamp_min(1e-12).sqrt() for b in (p, n))
    pos, neg = F.relu(d_ap - beta + loss.margin), F.relu(beta - d_an + loss.margin)
    divisor = (torch.count_nonzero(pos) + torch.count_nonzero(neg)).clamp_min(1)
    reg = beta.sum() / divisor if len(loss.beta) > 1 else loss.beta[0]
    return (pos + neg).sum() / divisor + loss.nu * reg, d_ap.mean(), d_an.mean()


class FixedTriplets(torch.nn.Module):
    """A miner that returns the same triplets every call (so both implementations see the same ones)."""

    produces = "triplets"

    def __init__(self, triplets: tuple[torch.Tensor, ...]):
        super().__init__()
        self.triplets = triplets

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.triplets


@pytest.mark.parametrize("triplets", ["all", "mined"])
@pytest.mark.parametrize(("per_class", "nu"), [(False, 0.0), (True, 0.1)])
def test_distance_matrix_form_equals_the_per_triplet_form(triplets: str, per_class: bool, nu: float) -> None:
    """Values, embedding and β gradients of the [B, B] form equal the per-triplet gathers it replaced, with
    duplicate embeddings (zero distances: a positive pair, a negative pair) and repeated mined triplets."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(8)[torch.randperm(32)]
    emb = torch.randn(32, 16) * 0.2 + 0.3  # close together: many active terms of both signs
    first = labels == labels[0]
    emb[int(first.nonzero()[1])] = emb[0]  # a positive at distance 0
    emb[int((~first).nonzero()[0])] = 2 * emb[0]  # a negative at distance 0 after normalisation
    mined = None
    if triplets == "mined":
        dw = registry.build("miner", "distance_weighted", path="miner")
        draws = [dw(emb, labels) for _ in range(2)]  # per-pair draws twice: repeated triplets
        mined = tuple(torch.cat(parts) for parts in zip(*draws, strict=True))
    loss = margin(per_class_beta=per_class, nu=nu, miner=None if mined is None else FixedTriplets(mined))
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.3, 0.5, len(loss.beta)))
    ours, old = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    out = loss(ours, labels)
    out.value.backward()
    beta_grad, loss.beta.grad = loss.beta.grad, None
    expected, pos_dist, neg_dist = per_triplet_margin(loss, old, labels, mined)
    expected.backward()
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(out.value, expected)
    torch.testing.assert_close(ours.grad, old.grad)
    torch.testing.assert_close(beta_grad, loss.beta.grad)
    torch.testing.assert_close(out.stats["pos_dist"], pos_dist.detach())
    torch.testing.assert_close(out.stats["neg_dist"], neg_dist.detach())
    assert out.stats["triplets"] == (len(mined[0]) if mined else 32 * 7 * 24)
