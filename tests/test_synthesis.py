"""Symmetrical synthesis: reflection identities (METHODS 4.1), hardest-candidate selection against a
naive loop, hand-made cases where the synthetic / the original is harder, diagnostics, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from harness import registry
from methods.synthesis import SymmetricalSynthesis, metric_matrix

METRICS = ("euclidean", "sqeuclidean", "cosine", "dot")


def _unit(deg: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))], dtype=torch.float64)


def test_registered_with_defaults() -> None:
    synth = registry.build("synthesis", "symmetrical")
    assert isinstance(synth, SymmetricalSynthesis)
    assert (synth.alpha, synth.beta, synth.norm, synth.pairing) == (2.0, 1.0, False, "official")


def test_reflection_identities() -> None:
    a, b = torch.randn(2, 5, 7, dtype=torch.float64)
    s = SymmetricalSynthesis()
    b_ref = s.reflect(a, b)  # b about a
    a_ref = s.reflect(b, a)  # a about b
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb)
    theta = torch.acos(cos)
    torch.testing.assert_close(b_ref.norm(dim=1), nb)
    torch.testing.assert_close((a * b_ref).sum(1), (a * b).sum(1))
    torch.testing.assert_close((a * a_ref).sum(1), na**2 * torch.cos(2 * theta))
    torch.testing.assert_close((b * b_ref).sum(1), nb**2 * torch.cos(2 * theta))
    torch.testing.assert_close((a_ref * b_ref).sum(1), na * nb * torch.cos(3 * theta))


def test_reflection_alpha_beta_and_norm() -> None:
    a, b = torch.randn(2, 4, 6, dtype=torch.float64)
    s = SymmetricalSynthesis(alpha=1.5, beta=0.5)
    proj = ((a * b).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True)) * a
    torch.testing.assert_close(s.reflect(a, b), 0.5 * (1.5 * proj - b))
    normed = SymmetricalSynthesis(alpha=1.5, beta=0.5, norm=True).reflect(a, b)
    torch.testing.assert_close(normed.norm(dim=1), a.norm(dim=1))
    # the official form a + ((b - a)ᵀû)û of the projection is the same point
    u = a / a.norm(dim=1, keepdim=True)
    torch.testing.assert_close(a + ((b - a) * u).sum(1, keepdim=True) * u, proj)


def _naive_hardest(x: torch.Tensor, labels: torch.Tensor, metric: str, s: SymmetricalSynthesis):
    """Loop over (i, k): the hardest candidate among x_k and its reflections; per (i, class) winners."""
    is_distance = metric in ("euclidean", "sqeuclidean")
    harder = (lambda u, v: u < v) if is_distance else (lambda u, v: u > v)
    b = len(labels)
    out = metric_matrix(x, x, metric).clone()
    entry_won = 0
    best_per_class: dict[tuple[int, int], tuple[float, bool]] = {}
    for i in range(b):
        for k in range(b):
            if labels[i] == labels[k]:
                continue
            best, synthetic = out[i, k].item(), False
            for m in range(b):
                if labels[m] == labels[k] and m != k:
                    v = metric_matrix(x[i : i + 1], s.reflect(x[m], x[k])[None], metric).item()
                    if harder(v, best):
                        best, synthetic = v, True
            out[i, k] = best
            entry_won += synthetic
            key = (i, int(labels[k]))
            if key not in best_per_class or harder(best, best_per_class[key][0]):
                best_per_class[key] = (best, synthetic)
    class_won = sum(w for _, w in best_per_class.values())
    n_neg = int((labels[:, None] != labels[None, :]).sum())
    return out, entry_won / n_neg, class_won / len(best_per_class)


@pytest.mark.parametrize("metric", METRICS)
def test_hardest_negatives_matches_naive_loop(metric: str) -> None:
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0])  # classes of 3, 3, 2 and a single image (class 2)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    s = SymmetricalSynthesis()
    got = s.hardest_negatives(x, labels, metric)
    want, entry_frac, class_frac = _naive_hardest(x, labels, metric, s)
    torch.testing.assert_close(got, want)
    diag = s.epoch_diagnostics()
    assert diag["synthetic_entry_fraction"] == pytest.approx(entry_frac)
    assert diag["synthetic_hard_fraction"] == pytest.approx(class_frac)
    assert 0 < class_frac < 1  # the data exercise both outcomes
    assert s.epoch_diagnostics() == {}  # reset after reading


def test_hand_made_synthetic_harder_and_original_harder() -> None:
    # anchor 0 at 0°; class 1 has points at 60° and 35°. Reflecting 60° about 35° gives 10° (harder than
    # both originals); reflecting 35° about 60° gives 85° (easier than 35°, so the original stays).
    x = torch.stack([_unit(0), _unit(-90), _unit(60), _unit(35)])
    labels = torch.tensor([0, 0, 1, 1])
    s = SymmetricalSynthesis()
    sim = s.hardest_negatives(x, labels, "cosine")
    assert sim[0, 2].item() == pytest.approx(math.cos(math.radians(10)))  # synthetic wins
    assert sim[0, 3].item() == pytest.approx(math.cos(math.radians(35)))  # original wins
    assert sim[0, 1].item() == pytest.approx(0.0, abs=1e-12)  # same class: plain value
    dist = s.hardest_negatives(x, labels, "euclidean")
    assert dist[0, 2].item() == pytest.approx(2 * math.sin(math.radians(5)))
    assert dist[0, 3].item() == pytest.approx(2 * math.sin(math.radians(17.5)))


def test_no_class_with_two_images_gives_plain_matrix() -> None:
    x, labels = torch.randn(4, 5), torch.arange(4)
    s = SymmetricalSynthesis()
    torch.testing.assert_close(
        s.hardest_negatives(x, labels, "sqeuclidean"), metric_matrix(x, x, "sqeuclidean")
    )
    assert s.epoch_diagnostics()["synthetic_hard_fraction"] == 0.0


def test_gradients_reach_reflection_axis() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    s = SymmetricalSynthesis()
    neg = labels[:, None] != labels[None, :]
    for metric in ("euclidean", "cosine"):  # some negatives come from reflections in both metrics
        s.hardest_negatives(x, labels, metric)
        assert s.epoch_diagnostics()["synthetic_entry_fraction"] > 0
    assert torch.autograd.gradcheck(lambda e: s.hardest_negatives(e, labels, "euclidean")[neg], (x,))
    assert torch.autograd.gradcheck(lambda e: s.hardest_negatives(e, labels, "cosine")[neg], (x,))


def test_unknown_metric_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        SymmetricalSynthesis().hardest_negatives(torch.randn(2, 2), torch.tensor([0, 1]), "manhattan")  # type: ignore[arg-type]


def test_bf16_autocast() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SymmetricalSynthesis().hardest_negatives(x, labels, "euclidean")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def _naive_mirror(axis: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``2 proj_axis(point) - point`` written out (alpha=2, beta=1)."""
    return 2 * (point @ axis) / (axis @ axis) * axis - point


def _naive_dist(u: torch.Tensor, v: torch.Tensor, metric: str) -> float:
    if metric == "cosine":
        return 1 - float(u @ v / (u.norm() * v.norm()))
    sq = float(((u - v) ** 2).sum())
    return sq if metric == "sqeuclidean" else math.sqrt(sq)


def _naive_paper_batch_all(x: torch.Tensor, labels: list[int], metric: str, margin: float) -> list[float]:
    """Gu & Ko's rule, one hinge per (anchor a, positive p, same-class negative pair {x_k, x_l}) with the
    hardest of {x_k, x_l, x_k', x_l'}; a negative class with one image in the batch gives one term with
    that image alone (no reflection exists)."""
    b, terms = len(labels), []
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = _naive_dist(x[a], x[p], metric)
            for k in range(b):
                members = [m for m in range(b) if labels[m] == labels[k]]
                if labels[k] == labels[a]:
                    continue
                if len(members) == 1:
                    terms.append(max(d_ap - _naive_dist(x[a], x[k], metric) + margin, 0.0))
                for l in members:
                    if l <= k:
                        continue
                    cands = (x[k], x[l], _naive_mirror(x[l], x[k]), _naive_mirror(x[k], x[l]))
                    d_an = min(_naive_dist(x[a], c, metric) for c in cands)
                    terms.append(max(d_ap - d_an + margin, 0.0))
    return terms


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["auto", "mean"])
def test_batch_all_triplet_follows_the_paper_rule(metric: str, reduction: str) -> None:
    """Symm + batch-all triplet: term count and value of the paper's one-hinge-per-negative-pair rule."""
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0, 3])  # classes of 4, 3, 2 images and a single one
    torch.manual_seed(0)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    margin = 0.5 if metric != "cosine" else 0.2
    loss = registry.build(
        "loss", "triplet", context={"miner": None, "synthesis": SymmetricalSynthesis()},
        mining="all", distance=metric, margin=margin, reduction=reduction,
    )  # fmt: skip
    out = loss(x, labels)
    terms = _naive_paper_batch_all(x, labels.tolist(), metric, margin)
    active = [t for t in terms if t > 0]
    assert 0 < len(active) < len(terms)  # the data exercise both hinge sides
    want = sum(terms) / (len(active) if reduction == "auto" else len(terms))
    assert out.stats["triplets"].item() == len(terms)
    assert out.value.item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("metric", METRICS)
def test_hardest_pair_negatives_matches_naive_loop(metric: str) -> None:
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0])  # classes of 3, 3, 2 and a single image (class 2)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    s = SymmetricalSynthesis()
    values, pair_labels = s.hardest_pair_negatives(x, labels, metric)
    harder = min if metric in ("euclidean", "sqeuclidean") else max
    m = lambda u, v: metric_matrix(u[None], v[None], metric).item()  # noqa: E731
    want, pair_won, per_class = {}, 0, {}
    for k in range(len(labels)):
        members = [j for j in range(len(labels)) if labels[j] == labels[k]]
        pairs = [(k, k)] if len(members) == 1 else [(k, j) for j in members if j > k]
        for kk, ll in pairs:
            for i in range(len(labels)):
                orig = harder(m(x[i], x[kk]), m(x[i], x[ll]))
                cands = [orig]
                if kk != ll:
                    cands += [m(x[i], _naive_mirror(x[ll], x[kk])), m(x[i], _naive_mirror(x[kk], x[ll]))]
                best = harder(cands)
                want[(i, kk, ll)] = best
                if labels[i] != labels[kk]:
                    synthetic = best != orig
                    pair_won += synthetic
                    key = (i, int(labels[kk]))
                    if key not in per_class or harder(best, per_class[key][0]) == best != per_class[key][0]:
                        per_class[key] = (best, synthetic)
    assert values.shape[1] == len(pair_labels) == 3 + 3 + 1 + 1  # pairs of classes 3, 0, 1 + the single
    for i in range(len(labels)):  # per anchor and class, the same values (columns in any order)
        for c in labels.unique().tolist():
            naive = sorted(v for (r, kk, _), v in want.items() if r == i and labels[kk] == c)
            torch.testing.assert_close(values[i, pair_labels == c].sort().values.tolist(), naive)
    n_neg_pairs = sum(1 for i, kk, _ in want if labels[i] != labels[kk])
    diag = s.epoch_diagnostics()
    assert diag["synthetic_entry_fraction"] == pytest.approx(pair_won / n_neg_pairs)
    assert diag["synthetic_hard_fraction"] == pytest.approx(
        sum(w for _, w in per_class.values()) / len(per_class)
    )
    assert 0 < pair_won < n_neg_pairs


def test_pair_rule_hand_made() -> None:
    # anchor 0 at 0°; class 1 has 60° and 35°: the pair's candidates are 60°, 35°, 10° (60° about 35°) and
    # 85° (35° about 60°), so the one term of the pair uses 10°, where the per-point rule made two terms.
    x = torch.stack([_unit(0), _unit(-90), _unit(60), _unit(35)])
    labels = torch.tensor([0, 0, 1, 1])
    s = SymmetricalSynthesis()
    sim, pair_labels = s.hardest_pair_negatives(x, labels, "cosine")
    assert pair_labels.tolist() == [0, 1]
    assert sim[0, 1].item() == pytest.approx(math.cos(math.radians(10)))
    dist, _ = s.hardest_pair_negatives(x, labels, "euclidean")
    assert dist[0, 1].item() == pytest.approx(2 * math.sin(math.radians(5)))


def test_pair_rule_agrees_with_batch_hard_per_class() -> None:
    """Per anchor and negative class the hardest pair value equals the hardest per-point value, so
    batch-hard (which keeps the per-point matrix) selects the same negative as the paper's rule."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3])
    x = torch.randn(10, 4, dtype=torch.float64)
    s = SymmetricalSynthesis()
    per_point = s.hardest_negatives(x, labels, "euclidean")
    per_pair, pair_labels = s.hardest_pair_negatives(x, labels, "euclidean")
    for c in labels.unique():
        torch.testing.assert_close(per_point[:, labels == c].amin(1), per_pair[:, pair_labels == c].amin(1))


def test_pair_rule_gradients_and_bf16() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    s = SymmetricalSynthesis()
    for metric in ("euclidean", "cosine"):
        assert torch.autograd.gradcheck(lambda e, m=metric: s.hardest_pair_negatives(e, labels, m)[0], (x,))
    x32 = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = registry.build("loss", "triplet", context={"miner": None, "synthesis": s}, mining="all")(
            x32, labels
        )
    out.value.backward()
    assert out.value.dtype == torch.float32 and torch.isfinite(x32.grad).all()


def _naive_negative_pairs(x: torch.Tensor, labels: list[int], a: int, metric: str) -> list[list[float]]:
    """Per same-class pair {x_k, x_l} of a class other than a's: the distances from x_a to its candidates
    x_k, x_l, x_k', x_l' (a class with one image in the batch: that image alone)."""
    out = []
    for k in range(len(labels)):
        if labels[k] == labels[a]:
            continue
        members = [m for m in range(len(labels)) if labels[m] == labels[k]]
        if len(members) == 1:
            out.append([_naive_dist(x[a], x[k], metric)])
        for l in (m for m in members if m > k):
            cands = (x[k], x[l], _naive_mirror(x[l], x[k]), _naive_mirror(x[k], x[l]))
            out.append([_naive_dist(x[a], c, metric) for c in cands])
    return out


def _naive_semi_hard(
    x: torch.Tensor, labels: list[int], metric: str, margin: float
) -> tuple[list[float], int]:
    """Symm + semi-hard, one hinge per positive pair (a, p): each negative pair is represented by its closest
    candidate farther than p, else its closest candidate; the negative is the closest representative
    farther than p, else the farthest representative (TF's semi-hard rule). Also the number of positive
    pairs without a farther candidate."""
    terms, fallbacks = [], 0
    for a in range(len(labels)):
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = _naive_dist(x[a], x[p], metric)
            reps = []
            for cands in _naive_negative_pairs(x, labels, a, metric):
                farther = [d for d in cands if d > d_ap]
                reps.append(min(farther) if farther else min(cands))
            farther = [d for d in reps if d > d_ap]
            d_an = min(farther) if farther else max(reps)
            fallbacks += not farther
            terms.append(max(d_ap - d_an + margin, 0.0))
    return terms, fallbacks


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_semi_hard_triplet_follows_the_paper_rule(metric: str) -> None:
    """Symm + semi-hard triplet (the paper's † rows) against a loop over (anchor, positive, negative pair)."""
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0, 3])  # classes of 4, 3, 2 images and a single one
    torch.manual_seed(1)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    x[2] = -3 * x[0]  # a positive farther than every candidate: the pair (0, 2) takes the fallback
    margin = 0.5 if metric != "cosine" else 0.2
    loss = registry.build(
        "loss", "triplet", context={"miner": None, "synthesis": SymmetricalSynthesis()},
        mining="semi_hard", distance=metric, margin=margin,
    )  # fmt: skip
    out = loss(x, labels)
    terms, fallbacks = _naive_semi_hard(x, labels.tolist(), metric, margin)
    assert 0 < sum(t > 0 for t in terms) < len(terms) and fallbacks > 0
    assert out.stats["triplets"].item() == len(terms)
    assert out.value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_semi_hard_pair_rule_hand_made() -> None:
    # anchor 0°, positive 40°; class 1 has 60° and 30° (candidates 60°, 30°, 0° = 60° about 30°, 90°), class 2
    # one image at 70°. From 0°, the per-point rule keeps 0° for 60° and 30° for 30°, neither farther than
    # 40°, so it chose 70°; the pair rule keeps the pair's 60°. From 40° (positive 0°): class 1's 90° (50°).
    # Class 1's own pairs: from 60° (positive 30°) class 0's 0° (60° away); from 30° class 2's 70° (40°).
    x = torch.stack([_unit(0), _unit(40), _unit(60), _unit(30), _unit(70)])
    labels = torch.tensor([0, 0, 1, 1, 2])
    loss = registry.build(
        "loss", "triplet", context={"miner": None, "synthesis": SymmetricalSynthesis()},
        mining="semi_hard", distance="cosine", margin=0.3,
    )  # fmt: skip
    cos = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    want = sum(max(cos(n) - cos(p) + 0.3, 0) for p, n in ((40, 60), (40, 50), (30, 60), (30, 40))) / 4
    assert loss(x, labels).value.item() == pytest.approx(want)


def _naive_lifted(x: torch.Tensor, labels: list[int], margin: float, generalized: bool) -> float:
    """Symm + lifted structured (or Hermans' generalised form): every negative of a log-sum-exp is a
    same-class negative pair at the distance of its hardest candidate."""
    b = len(labels)
    neg = [[min(c) for c in _naive_negative_pairs(x, labels, i, "euclidean")] for i in range(b)]
    lse_neg = [math.log(sum(math.exp(margin - d) for d in row)) for row in neg]
    dist = [[_naive_dist(x[i], x[j], "euclidean") for j in range(b)] for i in range(b)]
    positives = [[j for j in range(b) if j != i and labels[j] == labels[i]] for i in range(b)]
    if generalized:
        terms = [
            max(math.log(sum(math.exp(dist[i][j]) for j in positives[i])) + lse_neg[i], 0.0)
            for i in range(b)
            if positives[i]
        ]
        return sum(terms) / len(terms)
    terms = []
    for i in range(b):
        for j in positives[i]:
            both = sum(math.exp(margin - d) for d in neg[i] + neg[j])
            terms.append(0.5 * max(math.log(both) + dist[i][j], 0.0) ** 2)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("name", ["lifted_structured", "generalized_lifted_structured"])
def test_lifted_follows_the_paper_rule(name: str) -> None:
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0, 3])
    torch.manual_seed(2)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    margin = 1.0
    rule = {} if name.startswith("generalized") else {"synthesis_rule": "per_pair"}  # the named variant
    loss = registry.build("loss", name, context={"synthesis": SymmetricalSynthesis()}, margin=margin, **rule)
    want = _naive_lifted(x, labels.tolist(), margin, generalized=name.startswith("generalized"))
    assert want > 0
    assert loss(x, labels).value.item() == pytest.approx(want, rel=1e-9)


def _naive_lifted_per_negative(x: torch.Tensor, labels: list[int], margin: float, synthesis: bool) -> float:
    """Lifted structured (METHODS.md §4.3's reading of Symm + lifted): J_ij keeps every negative k of i and
    of j, each at its smallest distance over x_k and x_k reflected about every other member of its class."""
    b = len(labels)
    s = SymmetricalSynthesis()

    def d_neg(i: int, k: int) -> float:
        cands = [x[k]]
        if synthesis:
            cands += [s.reflect(x[m], x[k]) for m in range(b) if m != k and labels[m] == labels[k]]
        return min(_naive_dist(x[i], c, "euclidean") for c in cands)

    terms = []
    for i in range(b):
        for j in range(b):
            if j == i or labels[j] != labels[i]:
                continue
            negs = [d_neg(i, k) for k in range(b) if labels[k] != labels[i]]
            negs += [d_neg(j, k) for k in range(b) if labels[k] != labels[j]]
            both = sum(math.exp(margin - d) for d in negs)
            terms.append(0.5 * max(math.log(both) + _naive_dist(x[i], x[j], "euclidean"), 0.0) ** 2)
    return sum(terms) / len(terms)


def test_lifted_with_synthesis_keeps_every_negative_at_its_hardest_candidate() -> None:
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 2, 1, 0, 3])
    torch.manual_seed(2)
    x = torch.randn(len(labels), 3, dtype=torch.float64)
    s = SymmetricalSynthesis()
    loss = registry.build("loss", "lifted_structured", context={"synthesis": s}, margin=1.0)
    assert loss.synthesis_rule == "per_negative"  # the default
    want = _naive_lifted_per_negative(x, labels.tolist(), 1.0, synthesis=True)
    assert want > _naive_lifted_per_negative(x, labels.tolist(), 1.0, synthesis=False)
    assert loss(x, labels).value.item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_lifted_with_synthesis_is_never_below_plain_lifted(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # the studies' batches (2 images per class: per pair, half the negative terms), then random labels
    pk = torch.arange(6).repeat_interleave(2)
    labels = pk if seed % 2 == 0 else torch.randint(0, 4, (12,), generator=gen)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64) * (0.2 + seed / 10)
    margin = [0.1, 1.0, 3.0][seed % 3]
    plain = registry.build("loss", "lifted_structured", context={"synthesis": None}, margin=margin)
    s = SymmetricalSynthesis()
    symm = registry.build("loss", "lifted_structured", context={"synthesis": s}, margin=margin)
    assert symm(x, labels).value.item() >= plain(x, labels).value.item() - 1e-12


def test_semi_hard_and_lifted_pair_rule_gradients() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    s = SymmetricalSynthesis()
    semi = registry.build(
        "loss", "triplet", context={"miner": None, "synthesis": s}, mining="semi_hard", margin=2.0
    )
    lifted = registry.build("loss", "lifted_structured", context={"synthesis": s})
    for loss in (semi, lifted):
        assert torch.autograd.gradcheck(lambda e, f=loss: f(e, labels).value, (x,))
