"""N-pair and angular losses (with and without symmetrical synthesis): naive per-sample loops written
from the formulas, pytorch-metric-learning parity, gradcheck, edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pytorch_metric_learning import distances, losses

from harness import registry
from methods.losses.angular import AngularLoss
from methods.losses.npair import NPairLoss, first_two_per_class
from methods.synthesis import SymmetricalSynthesis

# classes 4 (3 images), 1 (2), 7 (single image: skipped), 2 (3), shuffled
LABELS = torch.tensor([4, 1, 2, 4, 7, 2, 1, 4, 2])


def _pairs(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive: the first two images (in batch order) of every class with two or more."""
    a, p = [], []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        if len(idx) >= 2:
            a.append(x[idx[0]])
            p.append(x[idx[1]])
    return torch.stack(a), torch.stack(p)


def _reg(a: torch.Tensor, p: torch.Tensor, l2_reg: float) -> torch.Tensor:
    return l2_reg * 0.25 * (sum(v @ v for v in a) / len(a) + sum(v @ v for v in p) / len(p))


def _softmax_loss(logit) -> torch.Tensor:
    """Naive mean over anchors of log(1 + Σ_{j≠i} exp(logit(i, j) − logit(i, i)))."""
    n = logit.n
    terms = []
    for i in range(n):
        terms.append(torch.log(1 + sum(torch.exp(logit(i, j) - logit(i, i)) for j in range(n) if j != i)))
    return sum(terms) / n


class _Logit:
    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n

    def __call__(self, i: int, j: int) -> torch.Tensor:
        return self.fn(i, j)


def _angular_entry(x: torch.Tensor, y: torch.Tensor, i: int, j: int, sq_tan: float) -> torch.Tensor:
    if i == j:
        return 2 * (1 + sq_tan) * (x[i] @ y[i])
    return 4 * sq_tan * ((x[i] + y[i]) @ y[j])


def test_first_two_per_class() -> None:
    a, p = first_two_per_class(LABELS)
    assert a.tolist() == [1, 2, 0] and p.tolist() == [6, 5, 3]  # classes 1, 2, 4 in label order


def test_npair_matches_naive_loop() -> None:
    x = torch.randn(len(LABELS), 6, dtype=torch.float64)
    a, p = _pairs(x, LABELS)
    want = _softmax_loss(_Logit(lambda i, j: a[i] @ p[j], len(a))) + _reg(a, p, 0.002)
    out = NPairLoss(synthesis=None)(x, LABELS)
    torch.testing.assert_close(out.value, want)
    assert out.stats["pairs"] == 3


def test_npair_matches_pml() -> None:
    x = torch.randn(len(LABELS), 6)
    pml = losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    torch.testing.assert_close(NPairLoss(l2_reg=0.0, synthesis=None)(x, LABELS).value, pml(x, LABELS))


def test_angular_matches_naive_loop() -> None:
    x = torch.randn(len(LABELS), 6, dtype=torch.float64)
    a, p = _pairs(x, LABELS)
    sq_tan = math.tan(math.radians(45)) ** 2
    want = _softmax_loss(_Logit(lambda i, j: _angular_entry(a, p, i, j, sq_tan), len(a))) + _reg(a, p, 0.002)
    torch.testing.assert_close(AngularLoss(synthesis=None)(x, LABELS).value, want)
    # with_npair adds a_iᵀp_j to every logit
    want_np = _softmax_loss(_Logit(lambda i, j: _angular_entry(a, p, i, j, sq_tan) + a[i] @ p[j], len(a)))
    got_np = AngularLoss(with_npair=True, l2_reg=0.0, synthesis=None)(x, LABELS).value
    torch.testing.assert_close(got_np, want_np)


def test_angular_matches_pml_on_normalised_pairs() -> None:
    x = torch.nn.functional.normalize(torch.randn(len(LABELS), 6), dim=1)
    a, p = _pairs(x, LABELS)
    pair_labels = torch.arange(len(a))
    # PML with ref_emb = positives: anchor i's positive is p_i, its negatives are p_j (j ≠ i); the ref labels
    # must be a different tensor object or PML drops the (i, i) pairs as self-pairs
    want = losses.AngularLoss(alpha=40)(a, pair_labels, ref_emb=p, ref_labels=pair_labels.clone())
    got = AngularLoss(alpha=40, l2_reg=0.0, normalize=True, synthesis=None)(x, LABELS).value
    torch.testing.assert_close(got, want)


def _naive_symm_logits(a, p, s: SymmetricalSynthesis, entry, pairings, skip_self_diag: bool):
    """Per entry (i, j): max over pairings (X, Y) of entry(X, Y, i, j), synthetics built row by row."""
    s1 = torch.stack([s.reflect(a[i], p[i]) for i in range(len(a))])
    s2 = torch.stack([s.reflect(p[i], a[i]) for i in range(len(a))])
    sets = (a, p, s1, s2)

    def logit(i: int, j: int) -> torch.Tensor:
        vals = [
            entry(sets[u], sets[v], i, j) for u, v in pairings if not (skip_self_diag and u == v and i == j)
        ]
        return torch.stack(vals).max()

    return _Logit(logit, len(a))


def test_symm_npair_official_matches_naive_six_pairings() -> None:
    x = torch.randn(len(LABELS), 5, dtype=torch.float64)
    a, p = _pairs(x, LABELS)
    s = SymmetricalSynthesis()
    six = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # (A,P) (A,S1) (A,S2) (P,S1) (P,S2) (S1,S2)
    logit = _naive_symm_logits(a, p, s, lambda u, v, i, j: u[i] @ v[j], six, False)
    want = _softmax_loss(logit) + _reg(a, p, 0.002)
    torch.testing.assert_close(NPairLoss(synthesis=s)(x, LABELS).value, want)
    assert 0 <= s.epoch_diagnostics()["synthetic_hard_fraction"] <= 1


def test_symm_npair_all_pairings_matches_naive_loop() -> None:
    x = torch.randn(len(LABELS), 5, dtype=torch.float64)
    a, p = _pairs(x, LABELS)
    s = SymmetricalSynthesis(pairing="all")
    every = list(itertools.product(range(4), repeat=2))
    logit = _naive_symm_logits(a, p, s, lambda u, v, i, j: u[i] @ v[j], every, True)
    want = _softmax_loss(logit)
    torch.testing.assert_close(NPairLoss(l2_reg=0.0, synthesis=s)(x, LABELS).value, want)


def test_symm_angular_official_matches_naive_twelve_pairings() -> None:
    x = torch.randn(len(LABELS), 5, dtype=torch.float64)
    a, p = _pairs(x, LABELS)
    s = SymmetricalSynthesis()
    sq_tan = math.tan(math.radians(45)) ** 2
    twelve = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3), (2, 1), (2, 0), (2, 3), (3, 1), (3, 0), (3, 2)]
    logit = _naive_symm_logits(a, p, s, lambda u, v, i, j: _angular_entry(u, v, i, j, sq_tan), twelve, False)
    want = _softmax_loss(logit) + _reg(a, p, 0.002)
    torch.testing.assert_close(AngularLoss(synthesis=s)(x, LABELS).value, want)


def test_synthesis_raises_negative_logits_and_keeps_positive_ones() -> None:
    # unit norms and cos θ ≥ 0 between a pair: cos 2θ and cos 3θ never exceed cos θ, so the positive
    # (diagonal) logit stays aᵀp while every negative logit can only grow (METHODS 4.3)
    a = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(a + 0.5 * torch.randn(6, 5, dtype=torch.float64), dim=1)
    assert ((a * p).sum(1) > 0).all()
    pooled = NPairLoss(synthesis=SymmetricalSynthesis()).logits(a, p)
    plain = a @ p.T
    torch.testing.assert_close(pooled.diagonal(), plain.diagonal())
    off = ~torch.eye(6, dtype=torch.bool)
    assert (pooled[off] >= plain[off]).all() and (pooled[off] > plain[off]).any()


@pytest.mark.parametrize("synthesis", [None, "official", "all"])
@pytest.mark.parametrize("loss_cls", [NPairLoss, AngularLoss])
def test_gradcheck_float64(loss_cls, synthesis) -> None:
    s = None if synthesis is None else SymmetricalSynthesis(pairing=synthesis)
    loss = loss_cls(synthesis=s)
    x = torch.randn(len(LABELS), 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: loss(e, LABELS).value, (x,))


@pytest.mark.parametrize("name", ["npair", "angular"])
@pytest.mark.parametrize("with_synthesis", [False, True])
def test_no_pair_gives_zero_and_zero_gradient(name: str, with_synthesis: bool) -> None:
    synth = SymmetricalSynthesis() if with_synthesis else None
    loss = registry.build("loss", name, context={"synthesis": synth})
    x = torch.randn(4, 6, requires_grad=True)
    out = loss(x, torch.arange(4))
    out.value.backward()
    assert out.value.item() == 0.0 and out.stats["pairs"] == 0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("loss_cls", [NPairLoss, AngularLoss])
def test_single_pair_is_finite(loss_cls) -> None:
    x = torch.randn(3, 6, requires_grad=True)
    out = loss_cls(l2_reg=0.0, synthesis=SymmetricalSynthesis())(x, torch.tensor([0, 1, 0]))
    out.value.backward()
    assert out.value.item() == 0.0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_cls", [NPairLoss, AngularLoss])
@pytest.mark.parametrize("with_synthesis", [False, True])
def test_bf16_autocast(loss_cls, with_synthesis: bool) -> None:
    x = torch.randn(len(LABELS), 8, requires_grad=True)
    loss = loss_cls(synthesis=SymmetricalSynthesis() if with_synthesis else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, LABELS)
    out.value.backward()
    assert torch.isfinite(out.value) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.value, loss(x, LABELS).value, atol=0.1, rtol=0.05)
