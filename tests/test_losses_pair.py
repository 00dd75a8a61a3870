"""Pair-based losses (contrastive, triplet, multi-similarity, lifted): against naive per-sample loops
written from METHODS.md, against pytorch-metric-learning, gradcheck, edge cases, synthesis hook."""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import MeanReducer

from harness import registry
from harness.errors import ConfigError
from methods.distances import cosine_similarity, label_masks, masked_logsumexp, pairwise_distance
from methods.losses.contrastive import ContrastiveLoss
from methods.losses.multi_similarity import MultiSimilarityLoss
from methods.losses.triplet import TripletLoss
from methods.miners import BatchHardMiner, MultiSimilarityMiner

PAIR_LOSSES = (
    "contrastive",
    "triplet",
    "multi_similarity",
    "lifted_structured",
    "generalized_lifted_structured",
)


def pk(p: int, k: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)[torch.randperm(p * k)]


def build(name: str, miner: Any = None, synthesis: Any = None, **params: Any) -> Any:
    return registry.build("loss", name, context={"miner": miner, "synthesis": synthesis}, **params)


def value(loss: Any, emb: torch.Tensor, labels: torch.Tensor) -> float:
    return loss(emb, labels).value.item()


# ---- naive references: plain loops over pairs / triplets, straight from the formulas ----


def naive_dist(x: torch.Tensor, metric: str = "euclidean") -> list[list[float]]:
    b = len(x)
    out = [[0.0] * b for _ in range(b)]
    for i, j in product(range(b), repeat=2):
        if metric == "cosine":
            out[i][j] = 1 - float(F.cosine_similarity(x[i], x[j], dim=0))
        else:
            sq = float(((x[i] - x[j]) ** 2).sum())
            out[i][j] = sq if metric == "sqeuclidean" else math.sqrt(sq)
    return out


def naive_cos(x: torch.Tensor) -> list[list[float]]:
    return [[1 - d for d in row] for row in naive_dist(x, "cosine")]


def relu(v: float) -> float:
    return max(v, 0.0)


def naive_triplet(d: list[list[float]], y: list[int], mining: str, margin: float, nonzero: bool) -> float:
    terms = []
    b = len(y)
    for a in range(b):
        positives = [p for p in range(b) if p != a and y[p] == y[a]]
        negatives = [n for n in range(b) if y[n] != y[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            terms.append(relu(max(d[a][p] for p in positives) - min(d[a][n] for n in negatives) + margin))
            continue
        for p in positives:
            if mining == "all":
                terms += [relu(d[a][p] - d[a][n] + margin) for n in negatives]
            else:  # semi_hard, TF rule
                farther = [d[a][n] for n in negatives if d[a][n] > d[a][p]]
                d_an = min(farther) if farther else max(d[a][n] for n in negatives)
                terms.append(relu(d[a][p] - d_an + margin))
    if nonzero:
        terms = [t for t in terms if t > 0]
    return sum(terms) / len(terms) if terms else 0.0


def naive_contrastive(d: list[list[float]], y: list[int], variant: str, pos_m: float, neg_m: float) -> float:
    pos, neg = [], []
    for i, j in product(range(len(y)), repeat=2):
        if i == j:
            continue
        if y[i] == y[j]:
            pos.append(0.5 * d[i][j] ** 2 if variant == "paper" else relu(d[i][j] - pos_m))
        else:
            neg.append(0.5 * relu(neg_m - d[i][j]) ** 2 if variant == "paper" else relu(neg_m - d[i][j]))
    if variant == "paper":
        return sum(pos) + sum(neg)

    def avg_nonzero(v: list[float]) -> float:
        nz = [t for t in v if t > 0]
        return sum(nz) / len(nz) if nz else 0.0

    return avg_nonzero(pos) + avg_nonzero(neg)


def naive_ms_official(
    s: list[list[float]], y: list[int], alpha: float, beta: float, lam: float, eps: float
) -> float:
    """The official MalongTech loop, anchor by anchor."""
    total = 0.0
    for i in range(len(y)):
        pos = [s[i][j] for j in range(len(y)) if y[j] == y[i] and s[i][j] < 1 - 1e-5]
        neg = [s[i][k] for k in range(len(y)) if y[k] != y[i]]
        if not pos or not neg:
            continue
        neg_kept = [v for v in neg if v + eps > min(pos)]
        pos_kept = [v for v in pos if v - eps < max(neg)]
        if not neg_kept or not pos_kept:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (v - lam)) for v in pos_kept)) / alpha
        total += math.log(1 + sum(math.exp(beta * (v - lam)) for v in neg_kept)) / beta
    return total / len(y)


def naive_lifted(d: list[list[float]], y: list[int], alpha: float) -> float:
    """Oh Song et al.: 1/(2|P̂|) Σ over unordered positive pairs of [J_ij]_+²."""
    b, terms = len(y), []
    for i in range(b):
        for j in range(i + 1, b):
            if y[i] != y[j]:
                continue
            s = sum(math.exp(alpha - d[i][k]) for k in range(b) if y[k] != y[i])
            s += sum(math.exp(alpha - d[j][k]) for k in range(b) if y[k] != y[j])
            if s > 0:
                terms.append(relu(math.log(s) + d[i][j]) ** 2)
    return sum(terms) / (2 * len(terms)) if terms else 0.0


def naive_generalized_lifted(d: list[list[float]], y: list[int], margin: float) -> float:
    terms = []
    for a in range(len(y)):
        pos = [d[a][p] for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [d[a][n] for n in range(len(y)) if y[n] != y[a]]
        if pos and neg:
            lse_p = math.log(sum(math.exp(v) for v in pos))
            terms.append(relu(lse_p + math.log(sum(math.exp(margin - v) for v in neg))))
    return sum(terms) / len(terms) if terms else 0.0


# ---- shared distance helpers ----


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_distance_helpers_match_loops_and_gradcheck(metric: str) -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    got = pairwise_distance(x, metric)
    expected = torch.tensor(naive_dist(x.detach(), metric), dtype=torch.float64)
    torch.testing.assert_close(got.fill_diagonal_(0), expected.fill_diagonal_(0))
    weights = torch.randn(5, 5, dtype=torch.float64)  # a non-symmetric upstream gradient
    assert torch.autograd.gradcheck(lambda e: (pairwise_distance(e, metric) * weights).sum(), (x,))
    assert torch.autograd.gradcheck(lambda e: (cosine_similarity(e) * weights).sum(), (x,))


@pytest.mark.parametrize("fixed_size", [False, True], ids=["cpu-rule", "gpu-rule"])
def test_batch_distances_are_exact_at_duplicates_and_near_duplicates(
    fixed_size: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diagonal is 0 and (near-)duplicates come from their rows, value and gradient: the matmul form's
    rounding would leave them at ~1e-3 (float32, here) with a spurious gradient through the square root.
    The GPU's rule (a fixed number of candidates, no host read) gives the same as the CPU's."""
    from methods import distances

    rule = distances._near_pairs
    monkeypatch.setattr(distances, "_near_pairs", lambda out, cut, **_: rule(out, cut, fixed_size))
    x = torch.randn(6, 64) + 3.0  # away from the origin: large norms, large rounding of the matmul form
    x[1] = x[0]
    x[2] = x[0] + 1e-3 * torch.randn(64)
    x.requires_grad_(True)
    dist = pairwise_distance(x, "euclidean")
    rows = (x[:, None] - x[None]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    torch.testing.assert_close(dist, rows)
    assert dist[0, 1] == dist[1, 1] == rows[0, 1] == 1e-6  # sqrt of the clamp
    weights = torch.randn(6, 6)
    grad = torch.autograd.grad((dist * weights).sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad((rows * weights).sum(), x)[0])
    x64 = x.detach().double().requires_grad_(True)  # through the recomputed entries (no root at 0 here)
    assert torch.autograd.gradcheck(lambda e: (pairwise_distance(e, "sqeuclidean") * weights).sum(), (x64,))


@pytest.mark.parametrize("add_one", [False, True])
def test_masked_logsumexp_matches_loop_and_is_nan_free_on_empty_rows(add_one: bool) -> None:
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5) > 0.5
    mask[2] = False
    out = masked_logsumexp(torch.where(mask, x * 30, 1e4), mask, add_one=add_one)  # excluded: huge, ignored
    for r in range(4):
        terms = [math.exp(30 * v) for v, m in zip(x[r].tolist(), mask[r].tolist(), strict=True) if m]
        expected = math.log(add_one + sum(terms)) if terms else 0.0
        assert out[r].item() == pytest.approx(expected, rel=1e-9)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all() and (x.grad[~mask] == 0).all()
    torch.testing.assert_close(masked_logsumexp(x.T, mask.T, dim=0), masked_logsumexp(x, mask))


# ---- against the naive loops ----


@pytest.mark.parametrize(
    ("mining", "distance", "reduction"),
    [
        ("all", "euclidean", "auto"),
        ("all", "sqeuclidean", "mean"),
        ("batch_hard", "euclidean", "auto"),
        ("batch_hard", "cosine", "auto"),
        ("semi_hard", "sqeuclidean", "auto"),
        ("semi_hard", "euclidean", "mean_nonzero"),
    ],
)
def test_triplet_matches_naive_loop(mining: str, distance: str, reduction: str) -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])  # classes 3 and 4: single images (anchors dropped)
    emb = torch.randn(len(labels), 5)
    emb[:3] *= 4  # class 0 spread out: its positives are farther than every negative (semi-hard fallback)
    loss = build("triplet", mining=mining, distance=distance, reduction=reduction, margin=0.3)
    nonzero = reduction == "mean_nonzero" or (reduction == "auto" and mining == "all")
    expected = naive_triplet(naive_dist(emb, distance), labels.tolist(), mining, 0.3, nonzero)
    assert value(loss, emb, labels) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_triplet_batch_all_stats_count_active_triplets() -> None:
    labels = pk(4, 3)
    emb = torch.randn(len(labels), 4)
    out = build("triplet", mining="all", margin=0.1)(emb, labels)
    d = naive_dist(emb)
    y = labels.tolist()
    terms = [
        d[a][p] - d[a][n] + 0.1
        for a, p, n in product(range(12), repeat=3)
        if a != p and y[a] == y[p] and y[n] != y[a]
    ]
    assert float(out.stats["triplets"]) == len(terms) == 12 * 2 * 9
    assert float(out.stats["active_fraction"]) == pytest.approx(sum(t > 0 for t in terms) / len(terms))


@pytest.mark.parametrize("variant", ["paper", "pml"])
def test_contrastive_matches_naive_loop(variant: str) -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    emb = torch.randn(len(labels), 6) * 0.3
    loss = build("contrastive", variant=variant, pos_margin=0.1 if variant == "pml" else 0.0)
    x = F.normalize(emb, dim=1) if variant == "pml" else emb
    expected = naive_contrastive(naive_dist(x), labels.tolist(), variant, loss.pos_margin, loss.neg_margin)
    assert value(loss, emb, labels) == pytest.approx(expected, rel=1e-5)


def test_contrastive_abe_form_and_reductions() -> None:
    """Margins on unit vectors with mean reduction: mean hinge of positives + mean hinge of negatives."""
    labels = pk(3, 3)
    emb = torch.randn(9, 4)
    loss = build(
        "contrastive", normalize=True, pos_margin=0.3, neg_margin=1.2, squared=False, reduction="mean"
    )
    d, y = naive_dist(F.normalize(emb, dim=1)), labels.tolist()
    pairs = [(i, j) for i, j in product(range(9), repeat=2) if i != j]
    pos = [relu(d[i][j] - 0.3) for i, j in pairs if y[i] == y[j]]
    neg = [relu(1.2 - d[i][j]) for i, j in pairs if y[i] != y[j]]
    assert value(loss, emb, labels) == pytest.approx(sum(pos) / len(pos) + sum(neg) / len(neg), rel=1e-5)


def test_multi_similarity_official_matches_official_loop() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    emb = torch.randn(len(labels), 4)
    emb[1] = emb[0]  # an exact duplicate: dropped with the self-pair by the official 1 - 1e-5 rule
    loss = build("multi_similarity", epsilon=0.3, beta=40.0)
    expected = naive_ms_official(naive_cos(emb), labels.tolist(), 2.0, 40.0, 0.5, 0.3)
    assert value(loss, emb, labels) == pytest.approx(expected, rel=1e-5)


def test_lifted_matches_paper_formula() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    emb = torch.randn(len(labels), 3) * 0.5
    expected = naive_lifted(naive_dist(emb), labels.tolist(), 1.0)
    assert value(build("lifted_structured"), emb, labels) == pytest.approx(expected, rel=1e-5)


def test_generalized_lifted_matches_naive_loop() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    emb = torch.randn(len(labels), 3)
    expected = naive_generalized_lifted(naive_dist(emb), labels.tolist(), 1.5)
    assert value(build("generalized_lifted_structured", margin=1.5), emb, labels) == pytest.approx(
        expected, rel=1e-5
    )


# ---- against pytorch-metric-learning (same semantics; float64, values and gradients) ----

RAW = {"distance": LpDistance(normalize_embeddings=False)}


def _pml_cases() -> list[Any]:
    def batch_hard(reducer: Any = None, **kw: Any) -> Any:
        loss = pml_losses.TripletMarginLoss(**RAW, reducer=reducer or MeanReducer(), **kw)
        miner = pml_miners.BatchHardMiner(**RAW)
        return lambda e, y: loss(e, y, miner(e, y))

    def plain(loss: Any) -> Any:
        return lambda e, y: loss(e, y)

    def ms(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
        return pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(e, y, miner(e, y))

    return [
        pytest.param(
            ("triplet", {"mining": "all", "margin": 0.2}),
            plain(pml_losses.TripletMarginLoss(margin=0.2, **RAW)),
            id="triplet_all",
        ),
        pytest.param(
            ("triplet", {"mining": "all", "margin": 0.2, "reduction": "mean"}),
            plain(pml_losses.TripletMarginLoss(margin=0.2, reducer=MeanReducer(), **RAW)),
            id="triplet_all_mean",
        ),
        pytest.param(
            ("triplet", {"mining": "batch_hard", "margin": 0.2}),
            batch_hard(margin=0.2),
            id="triplet_batch_hard",
        ),
        pytest.param(
            ("triplet", {"mining": "batch_hard", "soft": True}),
            batch_hard(margin=0.0, smooth_loss=True),
            id="triplet_batch_hard_soft",
        ),
        pytest.param(
            ("contrastive", {"variant": "pml", "pos_margin": 0.2}),
            plain(pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=1.0)),
            id="contrastive_pml",
        ),
        pytest.param(("multi_similarity", {"variant": "pml"}), ms, id="multi_similarity"),
        pytest.param(
            ("lifted_structured", {}),
            plain(pml_losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, **RAW)),
            id="lifted",
        ),
        pytest.param(
            ("generalized_lifted_structured", {}),
            plain(pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, **RAW)),
            id="generalized_lifted",
        ),
    ]


@pytest.mark.parametrize(("ours", "theirs"), _pml_cases())
def test_matches_pytorch_metric_learning(ours: tuple[str, dict[str, Any]], theirs: Any) -> None:
    labels = pk(4, 4)
    base = (torch.randn(16, 8, dtype=torch.float64) * 0.4).requires_grad_(True)
    mine = base.detach().clone().requires_grad_(True)
    out = build(ours[0], **ours[1])(mine, labels).value
    ref = theirs(base, labels)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    out.backward()
    ref.backward()
    torch.testing.assert_close(mine.grad, base.grad, rtol=1e-5, atol=1e-8)


def test_pml_semihard_miner_is_not_facenet_semi_hard() -> None:
    """PML's TripletMarginMiner("semihard") keeps every negative within the margin: a different method."""
    labels = pk(4, 4)
    emb = torch.randn(16, 8)
    pml_miner = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard", **RAW)
    pml = pml_losses.TripletMarginLoss(margin=0.5, reducer=MeanReducer(), **RAW)(
        emb, labels, pml_miner(emb, labels)
    )
    ours = value(build("triplet", mining="semi_hard", margin=0.5), emb, labels)
    assert pml.item() != pytest.approx(ours, rel=1e-3)


# ---- external miners, gradients, dtypes, edge cases ----


def test_external_miner_replaces_built_in_mining() -> None:
    labels, emb = pk(4, 3), torch.randn(12, 5)
    built_in = value(build("triplet", mining="batch_hard"), emb, labels)
    assert value(build("triplet", miner=BatchHardMiner()), emb, labels) == pytest.approx(built_in)
    assert value(build("triplet", mining="all"), emb, labels) != pytest.approx(built_in)
    with pytest.raises(ConfigError, match="loss.mining: 'all' and the miner both choose the triplets"):
        build("triplet", mining="all", miner=BatchHardMiner())
    ms_pml = value(build("multi_similarity", variant="pml"), emb, labels)
    assert value(build("multi_similarity", variant="pml", miner=MultiSimilarityMiner()), emb, labels) == (
        pytest.approx(ms_pml)
    )
    assert TripletLoss.accepts_miner == ("triplets",)
    assert ContrastiveLoss.accepts_miner == MultiSimilarityLoss.accepts_miner == ("pairs",)


@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize(
    "selection", [{"miner": "batch_all"}, {"mining": "random"}, {"mining": "batch_hard"}]
)
def test_triplet_indexes_its_distance_matrix_like_per_triplet_gathers(
    distance: str, selection: dict[str, str]
) -> None:
    """Selected triplets index the [B, B] matrix (issue #30): the same value and gradient as the two
    gathered rows per triplet it replaced, duplicate embeddings (zero distances) included."""
    labels = pk(4, 4)
    emb = torch.randn(16, 8)
    first = labels == labels[0]
    emb[int(first.nonzero()[1])] = emb[0]  # a positive at distance 0
    emb[int((~first).nonzero()[0])] = emb[0]  # a negative at distance 0
    miner = registry.build("miner", selection["miner"]) if "miner" in selection else None
    loss = build("triplet", miner=miner, mining=selection.get("mining", "batch_hard"), distance=distance)
    mine = loss.select if miner is None else lambda *_: miner(emb, labels)
    ours, old = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    torch.manual_seed(0)  # random mining: the same draws for both
    out = loss(ours, labels)
    out.value.backward()
    torch.manual_seed(0)
    pos, neg = label_masks(labels)
    a, p, n = mine(emb, labels, pos, neg, pairwise_distance(emb, distance))

    def gathered(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if distance == "cosine":
            x = F.normalize(old, dim=1)
            return 1 - (x[i] * x[j]).sum(1)
        sq = (old[i] - old[j]).pow(2).sum(1)
        return sq.clamp_min(1e-12).sqrt() if distance == "euclidean" else sq

    expected = F.relu(gathered(a, p) - gathered(a, n) + loss.margin).mean()
    expected.backward()
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(out.value, expected)
    torch.testing.assert_close(ours.grad, old.grad)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("triplet", {"mining": "all"}),
        ("triplet", {"mining": "batch_hard", "soft": True}),
        ("triplet", {"mining": "semi_hard", "distance": "sqeuclidean"}),
        ("contrastive", {}),
        ("contrastive", {"variant": "pml"}),
        ("multi_similarity", {}),
        ("lifted_structured", {}),
        ("generalized_lifted_structured", {}),
    ],
)
def test_gradcheck_float64(name: str, params: dict[str, Any]) -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    emb = (torch.randn(6, 3, dtype=torch.float64) * 0.5).requires_grad_(True)
    loss = build(name, **params)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels).value, (emb,))


NO_VALID = [
    pytest.param(name, labels, id=f"{name}-{case}")
    for name in PAIR_LOSSES
    for case, labels in [("one_image", [7]), ("no_positive", [0, 1, 2, 3]), ("no_negative", [5, 5, 5, 5])]
    if name != "contrastive" or case == "one_image"  # contrastive has a term for either kind of pair
]


@pytest.mark.parametrize(("name", "labels"), NO_VALID)
def test_no_valid_pair_gives_zero_with_zero_gradient(name: str, labels: list[int]) -> None:
    emb = torch.randn(len(labels), 6, requires_grad=True)
    out = build(name)(emb, torch.tensor(labels))
    assert out.value.item() == 0.0 and out.value.requires_grad
    out.value.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    assert all(math.isfinite(float(v)) for v in out.stats.values())


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_duplicate_embeddings_give_finite_gradients(name: str) -> None:
    """Zero distances (duplicates, the diagonal) must not produce NaN through the square root."""
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = build(name)(emb, labels)
    out.value.backward()
    assert torch.isfinite(out.value) and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_bfloat16_autocast(name: str) -> None:
    labels = pk(4, 4)
    emb = torch.randn(16, 32)
    reference = value(build(name), emb, labels)
    half = emb.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build(name)(half, labels)
    out.value.backward()
    assert out.value.dtype == torch.float32
    assert (
        half.grad is not None
        and half.grad.dtype == torch.bfloat16
        and torch.isfinite(half.grad.float()).all()
    )
    assert out.value.item() == pytest.approx(reference, rel=0.05, abs=0.02)


def test_batch_all_never_builds_a_cube() -> None:
    """Batch-all keeps [positive pairs × B] tensors for backward, far below B³ for P×K batches."""
    labels = pk(16, 4)
    b = len(labels)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    emb = torch.randn(b, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        build("triplet", mining="all")(emb, labels).value.backward()
    assert largest <= b * b * 3 < b**3


# ---- synthesis hook ----


class StandInSynthesis:
    """Stands in for SymmetricalSynthesis: negative entries become harder by a fixed rule."""

    def __init__(self) -> None:
        self.metrics: list[str] = []

    def hardest_negatives(self, embeddings: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
        self.metrics.append(metric)
        negative = labels[:, None] != labels[None, :]
        if metric == "cosine":
            sim = F.normalize(embeddings, dim=1) @ F.normalize(embeddings, dim=1).T
            return torch.where(negative, 0.5 + 0.5 * sim, sim)
        sq = torch.cdist(embeddings, embeddings).pow(2)
        d = sq if metric == "sqeuclidean" else sq.clamp_min(1e-12).sqrt()
        return torch.where(negative, 0.7 * d, d)


def _harder(d: list[list[float]], y: list[int], sim: bool = False) -> list[list[float]]:
    return [
        [(0.5 + 0.5 * v if sim else 0.7 * v) if y[i] != y[j] else v for j, v in enumerate(row)]
        for i, row in enumerate(d)
    ]


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        (
            "triplet",
            {"mining": "batch_hard"},
            lambda d, y, e: naive_triplet(_harder(d, y), y, "batch_hard", 0.2, False),
        ),
        (
            "triplet",
            {"mining": "all", "distance": "sqeuclidean"},
            lambda d, y, e: naive_triplet(_harder(naive_dist(e, "sqeuclidean"), y), y, "all", 0.2, True),
        ),
        ("contrastive", {}, lambda d, y, e: naive_contrastive(_harder(d, y), y, "paper", 0.0, 0.7)),
        ("lifted_structured", {}, lambda d, y, e: naive_lifted(_harder(d, y), y, 1.0)),
        (
            "generalized_lifted_structured",
            {},
            lambda d, y, e: naive_generalized_lifted(_harder(d, y), y, 1.0),
        ),
        (
            "multi_similarity",
            {"epsilon": 0.5},
            lambda d, y, e: naive_ms_official(_harder(naive_cos(e), y, sim=True), y, 2.0, 50.0, 0.5, 0.5),
        ),
    ],
)
def test_synthesis_replaces_negative_distances(name: str, params: dict[str, Any], reference: Any) -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    emb = torch.randn(8, 4) * 0.5
    synth = StandInSynthesis()
    got = value(build(name, synthesis=synth, **params), emb, labels)
    assert synth.metrics, "the loss did not call hardest_negatives"
    assert got == pytest.approx(reference(naive_dist(emb), labels.tolist(), emb), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ["triplet", "lifted_structured", "multi_similarity"])
def test_symmetrical_synthesis_never_makes_a_loss_easier(name: str) -> None:
    if "symmetrical" not in registry.registry("synthesis"):
        pytest.skip("methods/synthesis.py not present")
    synth = registry.build("synthesis", "symmetrical")
    labels, emb = pk(4, 3), torch.randn(12, 6)
    plain = value(build(name), emb, labels)
    assert value(build(name, synthesis=synth), emb, labels) >= plain - 1e-5
