"""Retrieval metrics against a per-query brute-force loop, pytorch-metric-learning, and across backends."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from harness import evaluate
from harness.evaluate import knn, retrieval_metrics

KS = (1, 2, 4, 8)
RETRIEVAL = ("map@r", "r_precision", "precision@1")


def brute_force(gallery, g_labels, ks, query=None, q_labels=None, distance="cosine"):
    """Full distance matrix (float64, rounded as documented) and a python loop per query, ties by index."""
    self_mode = query is None
    query, q_labels = (gallery, g_labels) if self_mode else (query, q_labels)
    g = np.asarray(gallery, dtype=np.float32).astype(np.float64)
    q = np.asarray(query, dtype=np.float32).astype(np.float64)
    if distance == "cosine":
        cos = (q @ g.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(g, axis=1))
        dist = np.round((1 - np.clip(cos, -1, 1)) * 2**23) / 2**23
    else:
        dist = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    dist = dist.astype(np.float32)
    sums = dict.fromkeys([f"recall@{k}" for k in ks] + list(RETRIEVAL), 0.0)
    answered = 0
    for i in range(len(q)):
        others = [j for j in range(len(g)) if not (self_mode and j == i)]
        ranked = sorted(others, key=lambda j: (dist[i, j], j))
        rel = [g_labels[j] == q_labels[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        answered += 1
        for k in ks:
            sums[f"recall@{k}"] += any(rel[:k])
        sums["precision@1"] += rel[0]
        sums["r_precision"] += sum(rel[:r]) / r
        sums["map@r"] += sum(sum(rel[: t + 1]) / (t + 1) for t in range(r) if rel[t]) / r
    return {name: total / answered for name, total in sums.items()}


def tied_data(n, dim, n_classes, seed):
    """Vectors with entries in {-1, 0, 1}: many exact duplicates and exactly tied distances; no zero row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    x[np.abs(x).sum(1) == 0, 0] = 1
    return x, rng.integers(0, n_classes, size=n)


def gaussian_data(n, dim, n_classes, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.integers(0, n_classes, size=n)


def assert_metrics_equal(ours, expected, tol=1e-9):
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=tol), name


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("data", [tied_data, gaussian_data])
def test_self_mode_matches_brute_force(data, distance, backend):
    x, y = data(240, 4, 40, seed=1)
    ours = retrieval_metrics(x, y, ks=KS, distance=distance, backend=backend, nmi=False)
    assert_metrics_equal(ours, brute_force(x, y, KS, distance=distance))
    assert set(ours) == {*(f"recall@{k}" for k in KS), *RETRIEVAL}


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_query_gallery_mode_matches_brute_force(distance, backend):
    g, gl = tied_data(200, 3, 30, seed=2)
    q, ql = tied_data(120, 3, 35, seed=3)  # classes 30..34 have no gallery item: those queries are skipped
    ours = retrieval_metrics(g, gl, ks=(1, 5, 10), query_embeddings=q, query_labels=ql, distance=distance,
                             backend=backend, nmi=False)  # fmt: skip
    assert_metrics_equal(ours, brute_force(g, gl, (1, 5, 10), q, ql, distance=distance))


def test_hand_made_example():
    """Points on a line; neighbours of 0.0 are 0.1 (label 1), 0.3 (label 0), 1.0 (label 0), 3.0 (label 2)."""
    x = np.array([[0.0], [0.1], [0.3], [1.0], [3.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 0, 2])
    m = retrieval_metrics(x, y, ks=(1, 2), distance="euclidean", nmi=False)
    # query 0: ranks 0.1(1) 0.3(0) 1.0(0) -> R=2, miss@1, hit@2, AP@R = (1/2)/2, RP = 1/2
    # query 2 (0.3): ranks 0.1(1) 0.0(0) 1.0(0) -> same as query 0
    # query 3 (1.0): ranks 0.3(0) 0.1(1) 0.0(0) -> hit@1, AP@R = (1 + 0)/2 = 1/2, RP = 1/2
    # queries 1 and 4 are the only items of their class: left out
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["precision@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["r_precision"] == pytest.approx(1 / 2)
    assert m["map@r"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)


def test_exact_duplicates_count_and_ties_break_by_index(monkeypatch):
    """A tie group larger than the first search forces the completion loop; self is excluded by index."""
    rng = np.random.default_rng(4)
    x = np.concatenate([np.tile(rng.standard_normal((1, 8)), (40, 1)), rng.standard_normal((60, 8))])
    y = np.concatenate([np.arange(40) // 2, 100 + np.arange(60) // 3])
    calls = []
    search = evaluate._search
    monkeypatch.setattr(evaluate, "_search", lambda q, *a: calls.append(len(q)) or search(q, *a))
    for backend in ("faiss", "torch"):
        dist, idx = knn(x.astype(np.float32), 8, backend=backend)
        assert len(calls) > 1 and calls[1] < calls[0]  # only the unfinished rows are searched again
        calls.clear()
        expected = [[j for j in range(40) if j != i][:8] for i in range(40)]
        assert idx[:40].tolist() == expected
        assert (dist[:40] == 0).all()
    m = retrieval_metrics(x, y, distance="euclidean", nmi=False)
    assert_metrics_equal(m, brute_force(x, y, KS, distance="euclidean"))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("query_mode", [False, True])
def test_backends_agree_exactly_on_ties(distance, query_mode):
    g, _ = tied_data(500, 5, 50, seed=5)
    q = tied_data(300, 5, 50, seed=6)[0] if query_mode else None
    d_f, i_f = knn(g, 30, q, distance=distance, backend="faiss")
    d_t, i_t = knn(torch.from_numpy(g), 30, None if q is None else torch.from_numpy(q), distance=distance,
                   backend="torch")  # fmt: skip
    assert torch.equal(i_f, i_t) and torch.equal(d_f, d_t)
    assert (d_f[:, 1:] >= d_f[:, :-1]).all()


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n", [4000, 4007])  # a multiple of the group size and one with left-over columns
def test_two_stage_topk_equals_torch_topk(largest, n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(40, n, generator=gen)
    scores[:, ::7] = scores[:, :1]  # many ties, some at the top
    scores[3, -3:] = 100.0 if largest else -100.0  # winners among the left-over columns
    for k in (1, 12, 30):
        values, idx = evaluate._topk(scores, k, largest)
        expected = torch.topk(scores, k, dim=1, largest=largest).values
        assert torch.equal(values, expected)
        assert torch.equal(scores.gather(1, idx), values) and (idx.sort(1).values.diff(dim=1) > 0).all()


def test_auto_on_cpu_takes_the_faster_backend_of_a_probe_for_large_searches(monkeypatch):
    calls = []
    search = evaluate._search
    monkeypatch.setattr(evaluate, "_search", lambda *a: calls.append(a[-1]) or search(*a))
    g, _ = tied_data(400, 5, 40, seed=8)
    expected = knn(g, 10, backend="faiss")
    assert set(calls) == {"faiss-cpu"}  # a small search does not probe
    monkeypatch.setattr(evaluate, "AUTO_PROBE_MIN_WORK", 0)
    monkeypatch.setattr(evaluate, "AUTO_PROBE_SIZE", 256)
    evaluate._faster_cpu_backend.cache_clear()
    calls.clear()
    d, i = knn(g, 10)
    winner = evaluate._faster_cpu_backend(5)
    assert calls[:4] == ["faiss-cpu", "torch", "faiss-cpu", "torch"] and set(calls[4:]) == {winner}
    assert torch.equal(i, expected[1]) and torch.equal(d, expected[0])
    evaluate._faster_cpu_backend.cache_clear()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_ranking_ignores_backend_rounding_and_tie_order(monkeypatch, distance):
    """A backend whose distances carry rounding noise and whose tie order is arbitrary ranks the same."""
    g, _ = tied_data(300, 4, 30, seed=17)
    expected = knn(g, 20, distance=distance)
    search = evaluate._search
    rng = torch.Generator().manual_seed(0)

    def noisy_search(*args):
        approx, idx = search(*args)
        perm = torch.argsort(torch.rand(idx.shape, generator=rng), dim=1)
        noise = 1e-6 * (torch.rand(idx.shape, generator=rng) - 0.5)
        return (approx + noise).gather(1, perm), idx.gather(1, perm)

    monkeypatch.setattr(evaluate, "_search", noisy_search)
    d, i = knn(g, 20, distance=distance)
    assert torch.equal(i, expected[1]) and torch.equal(d, expected[0])


def pml_accuracy(x, y, distance, query=None, q_labels=None):
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI"),
        avg_of_avgs=False, k="max_bin_count", device=torch.device("cpu"),
    )  # fmt: skip
    prep = (
        (lambda a: torch.nn.functional.normalize(torch.from_numpy(a), dim=1))
        if distance == "cosine"
        else torch.from_numpy
    )
    if query is None:
        return calc.get_accuracy(prep(x), torch.from_numpy(y))
    return calc.get_accuracy(prep(query), torch.from_numpy(q_labels), prep(x), torch.from_numpy(y), False)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_matches_pytorch_metric_learning_self_mode(distance):
    x, y = gaussian_data(600, 16, 120, seed=7)
    y[0] = 999  # a class of one: PML and we both leave that query out
    ours = retrieval_metrics(x, y, distance=distance, backend="faiss")
    pml = pml_accuracy(x, y, distance)
    assert ours["precision@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=1e-6)  # same faiss k-means, seed and iterations


def test_matches_pytorch_metric_learning_query_gallery_mode():
    g, gl = gaussian_data(500, 16, 80, seed=8)
    q, ql = gaussian_data(300, 16, 90, seed=9)
    ours = retrieval_metrics(g, gl, query_embeddings=q, query_labels=ql, backend="torch", nmi=False)
    pml = pml_accuracy(g, gl, "cosine", q, ql)
    assert ours["precision@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


def test_nmi_scores_clusterable_data_high_and_noise_low():
    centers = np.random.default_rng(10).standard_normal((10, 32)) * 10
    y = np.repeat(np.arange(10), 30)
    x = (centers[y] + np.random.default_rng(11).standard_normal((300, 32))).astype(np.float32)
    assert retrieval_metrics(x, y)["nmi"] > 0.95
    assert retrieval_metrics(np.random.default_rng(12).standard_normal((300, 32)), y)["nmi"] < 0.3


def test_input_types_and_dtypes():
    x, y = gaussian_data(300, 8, 50, seed=13)
    half = torch.from_numpy(x).to(torch.bfloat16)
    expected = retrieval_metrics(half.float().numpy(), y, nmi=False)
    assert retrieval_metrics(half, torch.from_numpy(y), nmi=False) == expected
    assert retrieval_metrics(half.float().numpy().astype(np.float16).astype(np.float32), y, nmi=False) == \
        retrieval_metrics(half.float().numpy().astype(np.float16), y, nmi=False)  # fmt: skip
    text = np.array([f"id_{v:05d}" for v in y])  # In-Shop item ids are strings
    assert retrieval_metrics(x, text, nmi=False) == retrieval_metrics(x, y, nmi=False)


def test_invariants_and_edge_cases():
    x, y = gaussian_data(200, 8, 30, seed=14)
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8, 16, 500), nmi=False)
    assert m["recall@1"] == m["precision@1"]
    recalls = [m[f"recall@{k}"] for k in (1, 2, 4, 8, 16, 500)]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # K beyond the gallery: every neighbour
    lone = retrieval_metrics(x, np.arange(200), nmi=False)
    assert all(math.isnan(v) for v in lone.values())
    with pytest.raises(ValueError, match="rows"):
        retrieval_metrics(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(x, y, query_embeddings=x)


def test_torch_backend_memory_is_bounded(monkeypatch):
    """20,000 x 64 with 8 MiB blocks: no N x N score matrix, small numpy peak, same result as faiss."""
    x, _ = gaussian_data(20_000, 64, 1, seed=15)
    y = np.arange(20_000) // 5
    block_bytes = 8 * 2**20
    monkeypatch.setattr(evaluate, "TORCH_BLOCK_BYTES", block_bytes)
    blocks = []
    topk_block = evaluate._topk_block
    monkeypatch.setattr(
        evaluate, "_topk_block", lambda q, g, *a: blocks.append(len(q) * len(g)) or topk_block(q, g, *a)
    )
    tracemalloc.start()
    ours = retrieval_metrics(x, y, backend="torch", nmi=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(blocks) > 1 and 4 * max(blocks) <= block_bytes
    assert peak < 32 * 2**20  # an N x N float32 matrix alone would be 1.6 GB
    assert ours == retrieval_metrics(x, y, backend="faiss", nmi=False)


@pytest.mark.cuda
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_cuda_matches_cpu(distance):
    x, y = tied_data(400, 5, 60, seed=16)
    cpu = retrieval_metrics(x, y, distance=distance, nmi=False)
    cuda = torch.from_numpy(x).cuda()
    for backend in ("auto", "torch", "faiss"):
        assert (
            retrieval_metrics(cuda, torch.from_numpy(y).cuda(), distance=distance, backend=backend, nmi=False)
            == cpu
        )


def naive_pair_f1(labels, clusters):
    """Pairwise clustering F1 by a loop over unordered pairs (Oh Song et al. 2016's definition)."""
    tp = fp = fn = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
            tp += same_class and same_cluster
            fp += same_cluster and not same_class
            fn += same_class and not same_cluster
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_f1_matches_pair_loop_and_sklearn(seed):
    from sklearn.metrics.cluster import pair_confusion_matrix

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 90)
    clusters = np.where(rng.random(90) < 0.6, labels, rng.integers(0, 9, 90))  # partly right clusters
    got = evaluate.clustering_f1(labels, clusters)
    assert got == pytest.approx(naive_pair_f1(labels, clusters), rel=1e-12)
    (_, fp), (fn, tp) = pair_confusion_matrix(labels, clusters)  # ordered pairs: all counts doubled
    assert got == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert 0.2 < got < 0.9


def test_clustering_f1_edge_cases():
    y = np.array([0, 0, 1, 1, 2])
    assert evaluate.clustering_f1(y, np.array([5, 5, 3, 3, 9])) == 1.0  # same partition, other names
    assert evaluate.clustering_f1(y, np.arange(5)) == 0.0  # no pair shares a cluster
    assert evaluate.clustering_f1(y, np.zeros(5)) == pytest.approx(naive_pair_f1(y, np.zeros(5)))


def test_f1_uses_the_nmi_kmeans_assignment(monkeypatch):
    x, y = gaussian_data(300, 16, 30, seed=14)
    seen = []
    real = evaluate.kmeans_clusters

    def spy(points, n, distance):
        seen.append(real(points, n, distance))
        return seen[-1]

    monkeypatch.setattr(evaluate, "kmeans_clusters", spy)
    m = retrieval_metrics(x, y)
    assert len(seen) == 1  # one k-means for both metrics
    codes = np.unique(y, return_inverse=True)[1]
    assert m["f1"] == pytest.approx(naive_pair_f1(codes, seen[0]))
    assert "f1" not in retrieval_metrics(x, y, nmi=False) and "nmi" not in retrieval_metrics(x, y, nmi=False)


def test_f1_scores_clusterable_data_high_and_noise_low():
    centers = np.random.default_rng(10).standard_normal((10, 32)) * 10
    y = np.repeat(np.arange(10), 30)
    x = (centers[y] + np.random.default_rng(11).standard_normal((300, 32))).astype(np.float32)
    assert retrieval_metrics(x, y)["f1"] > 0.8  # k-means may merge a pair of classes
    assert retrieval_metrics(np.random.default_rng(12).standard_normal((300, 32)), y)["f1"] < 0.2
