"""Miners: index outputs on hand-built embeddings, parity with pytorch-metric-learning, distance-weighted
sampling weights against the formula of METHODS.md 6.3."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from harness import registry
from methods.distances import label_masks
from methods.miners import distance_weights


def miner(name: str, **params: Any) -> Any:
    return registry.build("miner", name, **params)


def on_a_line(*xs: float) -> torch.Tensor:
    """2-D embeddings on the x axis, so distances are |x_i - x_j|."""
    return torch.tensor([[x, 0.0] for x in xs])


def as_set(*idx: torch.Tensor) -> set[tuple[int, ...]]:
    return set(zip(*(i.tolist() for i in idx), strict=True))


def test_produces_declares_the_index_layout() -> None:
    for name in ("batch_all", "batch_hard", "semi_hard", "random", "distance_weighted"):
        assert type(miner(name)).produces == "triplets"
    assert type(miner("multi_similarity")).produces == "pairs"


def test_batch_hard_picks_furthest_positive_and_closest_negative() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2: a single image, never an anchor
    emb = on_a_line(0, 1, 5.5, 2, 3, 9, 20)
    a, p, n = miner("batch_hard")(emb, labels)
    assert a.tolist() == [0, 1, 2, 3, 4, 5]
    assert p.tolist() == [2, 2, 0, 5, 5, 3]
    assert n.tolist() == [3, 3, 4, 1, 1, 2]


def test_batch_hard_matches_pml() -> None:
    labels = torch.arange(5).repeat_interleave(4)
    emb = torch.randn(20, 6)
    ours = miner("batch_hard")(emb, labels)
    theirs = pml_miners.BatchHardMiner(distance=LpDistance(normalize_embeddings=False))(emb, labels)
    assert as_set(*ours) == as_set(*theirs)


def test_semi_hard_picks_closest_farther_negative_else_farthest() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    emb = on_a_line(0, 1, 0.6, 2, 4)
    a, p, n = miner("semi_hard")(emb, labels)
    got = {(i, j): k for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)}
    assert got == {
        (0, 1): 3,  # negatives at 0.6, 2, 4 from 0; D_ap = 1: closest farther is 3
        (1, 0): 4,  # negatives at 0.4, 1 (= D_ap, not strictly farther), 3: picks 4
        (2, 3): 0,  # no negative farther than 1.4: fallback to the farthest (0, at 0.6)
        (2, 4): 0,
        (3, 2): 0,
        (3, 4): 0,
        (4, 2): 0,
        (4, 3): 1,
    }


def test_batch_all_enumerates_every_valid_triplet_once() -> None:
    p_classes, k = 4, 3
    labels = torch.arange(p_classes).repeat_interleave(k)
    a, p, n = miner("batch_all")(torch.randn(12, 4), labels)
    assert len(a) == p_classes * k * (k - 1) * (p_classes * k - k)
    assert as_set(a, p, n) == as_set(*lmu.get_all_triplets_indices(labels))


def test_random_draws_one_valid_negative_per_positive_pair_uniformly() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    pos, _ = label_masks(labels)
    counts = torch.zeros(6)
    for _ in range(300):
        a, p, n = miner("random")(torch.randn(6, 3), labels)
        assert as_set(a, p) == as_set(*pos.nonzero(as_tuple=True))
        assert (labels[a] != labels[n]).all()
        counts += torch.bincount(n[a == 0], minlength=6)
    assert counts[:2].sum() == 0 and (counts[2:] > 50).all()  # anchor 0: each of its 4 negatives drawn


def naive_distance_weights(emb: torch.Tensor, labels: list[int], normalize_over: str) -> torch.Tensor:
    """METHODS.md 6.3 element by element: normalised copy, D >= 0.5 (diagonal 1), log-weight, zero for
    non-negatives and D >= 1.4, uniform fallback; the max is over the row or over the candidates."""
    x = F.normalize(emb.double(), dim=1)
    b, dim = x.shape
    out = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        log_w, eligible = [], []
        for j in range(b):
            d = 1.0 if i == j else max(float((x[i] - x[j]).norm()), 0.5)
            log_w.append((2 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4))
            eligible.append(labels[i] != labels[j] and d < 1.4)
        top = max(w for w, e in zip(log_w, eligible, strict=True) if e or normalize_over == "row")
        row = [math.exp(w - top) if e else 0.0 for w, e in zip(log_w, eligible, strict=True)]
        if sum(row) == 0:
            row = [float(labels[i] != labels[j]) for j in range(b)]
        out[i] = torch.tensor(row) / sum(row)
    return out


@pytest.mark.parametrize("normalize_over", ["row", "candidates"])
def test_distance_weights_match_the_formula(normalize_over: str) -> None:
    labels = torch.arange(4).repeat_interleave(3)
    emb = torch.randn(12, 6)
    _, neg = label_masks(labels)
    got = distance_weights(emb, neg, 0.5, 1.4, normalize_over)
    expected = naive_distance_weights(emb, labels.tolist(), normalize_over)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_distance_weights_official_row_max_underflows_to_uniform() -> None:
    """In 512-D a very close positive dominates the row maximum: the official weights underflow and
    fall back to uniform; with the maximum over candidates they stay distance-weighted."""
    dim = 512
    dists = torch.tensor([0.1, 0.8, 1.0, 1.2, 1.3])  # from the anchor (e_0): a positive, then negatives
    cos = 1 - dists**2 / 2
    emb = torch.zeros(6, dim)
    emb[0, 0] = 1
    emb[1:, 0] = cos
    emb[1:, 1:6] = torch.diag((1 - cos**2).sqrt())
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    _, neg = label_masks(labels)
    row = distance_weights(emb, neg, 0.5, 1.4, "row")[0]
    candidates = distance_weights(emb, neg, 0.5, 1.4, "candidates")[0]
    torch.testing.assert_close(row, torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25]))
    assert candidates[2:].max() > 0.5 and candidates[:2].sum() == 0


def test_distance_weighted_samples_one_negative_per_ordered_positive_pair() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    emb = torch.randn(7, 16)
    pos, _ = label_masks(labels)
    a, p, n = miner("distance_weighted")(emb, labels)
    assert sorted(zip(a.tolist(), p.tolist(), strict=True)) == sorted(as_set(*pos.nonzero(as_tuple=True)))
    assert (labels[a] != labels[n]).all()
    no_negative = miner("distance_weighted")(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert all(len(t) == 0 for t in no_negative)


def test_distance_weighted_sampling_follows_the_weights() -> None:
    labels = torch.tensor([0, 0, 1, 2, 3])
    emb = torch.randn(5, 4)
    _, neg = label_masks(labels)
    weights = distance_weights(emb, neg, 0.5, 1.4, "row")[0]
    dw = miner("distance_weighted")
    draws = torch.cat([dw(emb, labels)[2][:1] for _ in range(400)])  # the pair (0, 1) comes first
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, weights, atol=0.08, rtol=0)


def test_multi_similarity_miner_matches_pml() -> None:
    labels = torch.arange(4).repeat_interleave(4)
    emb = torch.randn(16, 8)
    for eps in (0.05, 0.1, 0.5):
        a1, p, a2, n = miner("multi_similarity", epsilon=eps)(emb, labels)
        t1, tp, t2, tn = pml_miners.MultiSimilarityMiner(epsilon=eps)(emb, labels)
        assert as_set(a1, p) == as_set(t1, tp) and as_set(a2, n) == as_set(t2, tn)


def test_multi_similarity_miner_rule_on_hand_built_similarities() -> None:
    """Anchor 0: positives at cos 0.9 / 0.2, negatives at 0.3 / -0.5; ε = 0.1 keeps the negative at 0.3
    (0.3 + 0.1 > 0.2) and the positive at 0.2 (0.2 - 0.1 < 0.3), drops the 0.9 positive and the -0.5 one."""
    angles = torch.tensor([0.0, math.acos(0.9), math.acos(0.2), math.acos(0.3), -math.acos(-0.5)])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 2])
    a1, p, a2, n = miner("multi_similarity", epsilon=0.1)(emb, labels)
    assert {j for i, j in zip(a1.tolist(), p.tolist(), strict=True) if i == 0} == {2}
    assert {k for i, k in zip(a2.tolist(), n.tolist(), strict=True) if i == 0} == {3}


@pytest.mark.parametrize("name", ["batch_all", "batch_hard", "semi_hard", "random", "distance_weighted"])
def test_triplet_miners_output_valid_triplets_under_autocast(name: str) -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, p, n = miner(name)(torch.randn(8, 5).bfloat16(), labels)
    assert len(a) > 0 and (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert 5 not in a.tolist()  # the single image of class 2 has no positive


def test_miner_indices_carry_no_gradient() -> None:
    emb = torch.randn(8, 4, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    for name in ("batch_hard", "multi_similarity"):
        assert not any(t.requires_grad for t in miner(name)(emb, labels))
