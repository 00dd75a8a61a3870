"""Retrieval and clustering metrics of embeddings: Recall@K, MAP@R, R-precision, precision@1, NMI, F1.

Every metric is a fraction in [0, 1] (multiply by 100 for the percentages papers print).

Protocol. Without a query set every item is a query against all *other* items (the query itself is
excluded by index, so an exact duplicate of it still counts as a neighbour): CUB, Cars, SOP. With
``query_embeddings``/``query_labels`` every query searches the gallery (``embeddings``) with nothing
excluded: In-Shop. For query q, R(q) = number of gallery items with q's label (q itself not counted).

Ranking. Neighbours are ranked by distance, ties broken by gallery index. The distance is computed in
float64 from the float32 inputs, then rounded: the cosine distance 1 - cos(q, x) to a multiple of 2^-23
(float32's resolution at 1; an absolute grid, so exact duplicates tie at 0), the squared Euclidean distance
to float32. Equal rounded distances are ties. The faiss and torch backends only propose candidates; the
final order is recomputed that way, so all backends and devices rank identically.

* recall@K: fraction of queries for which ANY of the K nearest neighbours has the query's label (the DML
  meaning, as in the papers: not the information-retrieval recall).
* precision@1: fraction of queries whose nearest neighbour has the query's label (= recall@1).
* r_precision: mean over queries of (number of same-label items among the R nearest) / R.
* map@r: mean over queries of (1/R) * sum_{i <= R} P(i) * rel(i), where rel(i) says whether the i-th nearest
  neighbour has the query's label and P(i) is the precision of the i nearest (Musgrave et al. 2020,
  "A Metric Learning Reality Check"; equal to pytorch-metric-learning's ``AccuracyCalculator`` with
  ``avg_of_avgs=False``).
* Queries with R = 0 (no other item of their class in the gallery) cannot be answered: like
  pytorch-metric-learning, they are left out of every retrieval metric (not counted as misses); a metric
  is NaN when no query is left.
* nmi: k-means (faiss, k = number of classes, 20 iterations, seed 1234 as pytorch-metric-learning) on every
  embedding passed (gallery plus queries when given; L2-normalised for the cosine distance), scored
  against the labels by sklearn's ``normalized_mutual_info_score``.
* f1: the clustering F1 of the DML literature (Oh Song et al. 2016's evaluation code; the symmetrical
  synthesis tables) on the same k-means assignment as nmi: over unordered pairs of items, precision = the
  fraction of same-cluster pairs that are same-class, recall = the fraction of same-class pairs that are
  same-cluster, F1 = 2PR / (P + R) (0 when no pair is shared). Computed from the class × cluster
  contingency matrix, never an N × N one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import faiss
import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from harness.types import RANKING_METRICS, recall_name

log = logging.getLogger(__name__)

Distance = Literal["cosine", "euclidean"]
Backend = Literal["auto", "faiss", "torch"]

#: Largest query-chunk x gallery score block the torch backend allocates (bytes).
TORCH_BLOCK_BYTES = 256 * 2**20
#: Columns per group of the two-stage top-k of the torch backend.
TOPK_GROUP = 16
#: Largest query-chunk x candidates x dim block of the exact distance recomputation (bytes).
RECOMPUTE_BLOCK_BYTES = 4 * 2**20  # small blocks stay in cache: 4x faster than 64 MiB ones
#: faiss-gpu answers at most this many neighbours per query; larger searches use the torch backend.
FAISS_GPU_MAX_K = 2048
#: ``auto`` on the CPU probes faiss against torch (once per dimension) for searches larger than this many
#: query x gallery pairs; smaller ones take faiss (the probe would cost more than it can save).
AUTO_PROBE_MIN_WORK = 10**8
#: Gallery size of that probe (a quarter of it are the queries).
AUTO_PROBE_SIZE = 8192
#: Seed and iterations of the NMI k-means (pytorch-metric-learning's values).
KMEANS_SEED = 1234
KMEANS_NITER = 20


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    query_embeddings: Any = None,
    query_labels: Any = None,
    distance: Distance = "cosine",
    backend: Backend = "auto",
    nmi: bool = True,
) -> dict[str, float]:
    """Recall@K for each K in ``ks``, map@r, r_precision, precision@1 and (``nmi=True``) nmi and f1.

    ``embeddings [N, D]`` and ``labels [N]`` are the gallery (torch tensors on any device or numpy arrays;
    float16/bfloat16 are computed in float32). See the module docstring for the definitions.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError("give both query_embeddings and query_labels, or neither")
    self_mode = query_embeddings is None
    g_labels = _labels_numpy(labels, embeddings, "embeddings")
    q_labels = g_labels if self_mode else _labels_numpy(query_labels, query_embeddings, "query_embeddings")
    classes, codes = np.unique(np.concatenate([g_labels, q_labels]), return_inverse=True)
    g_codes, q_codes = codes[: len(g_labels)], codes[len(g_labels) :]
    relevant = np.bincount(g_codes, minlength=len(classes))[q_codes] - int(self_mode)

    k = max(max(ks), int(relevant.max(initial=0)))
    _, idx = knn(embeddings, k, query_embeddings, distance=distance, backend=backend)
    hits = g_codes[idx.cpu().numpy()] == q_codes[:, None]
    answerable = relevant > 0
    metrics = _ranking_metrics(hits[answerable], relevant[answerable], ks)
    if nmi:
        points = embeddings if self_mode else _cat(query_embeddings, embeddings)
        all_codes = np.concatenate([g_codes] if self_mode else [q_codes, g_codes])
        clusters = kmeans_clusters(points, len(np.unique(all_codes)), distance)
        metrics["nmi"] = float(normalized_mutual_info_score(all_codes, clusters))
        metrics["f1"] = clustering_f1(all_codes, clusters)
    return metrics


def knn(
    embeddings: Any,
    k: int,
    query_embeddings: Any = None,
    *,
    distance: Distance = "cosine",
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest gallery items of every query: ``(distances [Q, k'], indices [Q, k'])``.

    Without ``query_embeddings`` every gallery item is a query and itself is excluded (by index). Rows are
    sorted by (distance, index) with the exact rounded distances of the module docstring;
    k' = min(k, number of candidates). The tensors live on the device of ``embeddings``.
    """
    gallery = _as_float_tensor(embeddings)
    self_mode = query_embeddings is None
    query = gallery if self_mode else _as_float_tensor(query_embeddings).to(gallery.device)
    if gallery.ndim != 2 or query.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] with equal D, got {tuple(gallery.shape)} / {tuple(query.shape)}"
        )
    if not (torch.isfinite(gallery).all() and torch.isfinite(query).all()):
        raise ValueError("embeddings contain NaN or Inf (did training diverge?)")
    n, dim = gallery.shape
    k = min(k, n - int(self_mode))
    out_d = torch.empty(len(query), max(k, 0), dtype=torch.float32, device=gallery.device)
    out_i = torch.empty(len(query), max(k, 0), dtype=torch.int64, device=gallery.device)
    if k <= 0 or len(query) == 0:
        return out_d, out_i

    impl = _resolve_backend(backend, gallery.device, work=len(query) * n, dim=dim)
    search_g = _unit(gallery) if distance == "cosine" else gallery
    search_q = search_g if self_mode else (_unit(query) if distance == "cosine" else query)
    # Bound on |backend distance - exact distance|: 4x the float32 error bound of a length-dim dot product.
    bound = (dim + 8) * 2.0**-22
    if distance == "euclidean":
        tol = bound * (query.square().sum(1) + gallery.square().sum(1).max())
    else:
        tol = torch.full((len(query),), bound, device=gallery.device)

    g_norm = torch.linalg.vector_norm(gallery, dim=1, dtype=torch.float64) if distance == "cosine" else None
    pending = torch.arange(len(query), device=gallery.device)
    k_search = min(n, k + int(self_mode) + 2 + k // 16)  # a small margin: rows short of it are redone
    while len(pending):
        first = len(pending) == len(query)  # no row gathered yet: search the tensors themselves
        approx, cand = _search(search_q if first else search_q[pending], search_g, k_search, distance, impl)
        exact = _exact_distances(query if first else query[pending], gallery, cand, g_norm)
        if self_mode:
            exact[cand == pending[:, None]] = torch.inf
        order = torch.sort(cand, dim=1).indices  # indices are unique within a row
        cand, exact = cand.gather(1, order), exact.gather(1, order)
        order = torch.sort(exact, dim=1, stable=True).indices
        cand, exact = cand.gather(1, order)[:, :k], exact.gather(1, order)[:, :k]
        # Every item not proposed has backend distance >= the largest proposed one, hence an exact distance
        # > the k-th exact one: the top k is complete. Otherwise search that row again with twice as many.
        done = (approx.max(1).values - tol[pending] > exact[:, -1]) | (k_search == n)
        out_d[pending[done]], out_i[pending[done]] = exact[done], cand[done]
        pending = pending[~done]
        k_search = min(n, 2 * k_search)
    return out_d, out_i


def _ranking_metrics(hits: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K, precision@1, r_precision and map@r from the [Q, k] same-label matrix of ranked neighbours."""
    if len(hits) == 0:
        return dict.fromkeys([*map(recall_name, ks), *RANKING_METRICS], float("nan"))
    ranks = np.arange(1, hits.shape[1] + 1)
    in_r = hits & (ranks <= relevant[:, None])
    precision_at_i = np.cumsum(hits, axis=1) / ranks
    metrics = {recall_name(kk): float(hits[:, :kk].any(1).mean()) for kk in ks}
    metrics["map@r"] = float(((precision_at_i * in_r).sum(1) / relevant).mean())
    metrics["r_precision"] = float((in_r.sum(1) / relevant).mean())
    metrics["precision@1"] = float(hits[:, 0].mean())
    return metrics


def _search(
    query: torch.Tensor, gallery: torch.Tensor, k: int, distance: Distance, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend k-NN on search-ready vectors (unit vectors for cosine): (approximate distances, indices)."""
    if impl == "faiss-gpu" and k <= FAISS_GPU_MAX_K:
        from faiss.contrib import torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)

        metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
        scores, idx = faiss.knn_gpu(
            _gpu_resources(), query, gallery, k, metric=metric, device=gallery.device.index
        )
    elif impl == "faiss-cpu":
        metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
        found = faiss.knn(query.cpu().numpy(), gallery.cpu().numpy(), k, metric)
        scores, idx = (torch.from_numpy(a).to(query.device) for a in found)
    else:
        scores, idx = _torch_search(query, gallery, k, distance)
    return (1 - scores if distance == "cosine" else scores), idx


def _torch_search(
    query: torch.Tensor, gallery: torch.Tensor, k: int, distance: Distance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + topk: cosine similarities (largest first) or squared distances (smallest first)."""
    rows = max(1, TORCH_BLOCK_BYTES // (4 * len(gallery)))
    g_sq = gallery.square().sum(1) if distance == "euclidean" else None
    out = [_topk_block(query[s : s + rows], gallery, g_sq, k) for s in range(0, len(query), rows)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def _topk_block(
    query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of one [chunk, N] score block (similarities if ``g_sq`` is None, else squared distances)."""
    with _full_float32_matmul():
        if g_sq is None:
            return _topk(query @ gallery.T, k, largest=True)
        block = torch.addmm(g_sq, query, gallery.T, alpha=-2).add_(query.square().sum(1, keepdim=True))
        return _topk(block, k, largest=False)


def _topk(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` in two stages on wide blocks: the k groups of TOPK_GROUP columns with
    the best extremes hold every top-k entry, so one topk runs over the group extremes and one over their
    k·TOPK_GROUP columns (plus the < TOPK_GROUP columns left over). The values are torch.topk's."""
    rows, n = scores.shape
    whole = n - n % TOPK_GROUP
    if whole < 8 * k * TOPK_GROUP:
        return torch.topk(scores, k, dim=1, largest=largest)
    grouped = scores[:, :whole].view(rows, whole // TOPK_GROUP, TOPK_GROUP)
    extremes = grouped.amax(2) if largest else grouped.amin(2)
    groups = torch.topk(extremes, k, dim=1, largest=largest).indices
    offsets = torch.arange(TOPK_GROUP, device=scores.device)
    cand = (groups[:, :, None] * TOPK_GROUP + offsets).flatten(1)
    cand = torch.cat([cand, torch.arange(whole, n, device=scores.device).expand(rows, -1)], dim=1)
    values, picked = torch.topk(scores.gather(1, cand), k, dim=1, largest=largest)
    return values, cand.gather(1, picked)


def _exact_distances(
    query: torch.Tensor, gallery: torch.Tensor, idx: torch.Tensor, g_norm: torch.Tensor | None
) -> torch.Tensor:
    """Rounded float64 distances of query i to gallery items ``idx[i]`` (module docstring), in small chunks.

    ``g_norm``: float64 norms of the gallery rows for the cosine distance; None for squared Euclidean.
    """
    rows = max(1, RECOMPUTE_BLOCK_BYTES // (8 * idx.shape[1] * gallery.shape[1]))
    out = torch.empty(idx.shape, dtype=torch.float32, device=gallery.device)
    for s in range(0, len(idx), rows):
        chunk = idx[s : s + rows]
        q, x = query[s : s + rows].double(), gallery[chunk].double()
        if g_norm is None:
            out[s : s + rows] = (x - q[:, None]).square().sum(2)
        else:
            norms = q.norm(dim=1, keepdim=True) * g_norm[chunk]
            cos = torch.einsum("qd,qkd->qk", q, x) / norms.clamp_min(1e-300)
            out[s : s + rows] = torch.round((1 - cos.clamp(-1, 1)) * 2**23) / 2**23
    return out


def kmeans_clusters(points: Any, n_clusters: int, distance: Distance) -> np.ndarray:
    """faiss k-means cluster index of every point (KMEANS_SEED, KMEANS_NITER; L2-normalised for cosine)."""
    x = _as_float_tensor(points)
    x = _unit(x) if distance == "cosine" else x
    on_gpu = x.is_cuda and faiss_gpu_problem(x.device) is None
    x_np = np.ascontiguousarray(x.cpu().numpy())
    kmeans = faiss.Kmeans(
        x_np.shape[1], n_clusters, niter=KMEANS_NITER, seed=KMEANS_SEED, gpu=on_gpu, min_points_per_centroid=1
    )
    kmeans.train(x_np)
    return kmeans.index.search(x_np, 1)[1].ravel()


def clustering_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pairwise clustering F1 of ``clusters`` against ``labels`` (module docstring), from the contingency
    matrix: same-class-and-cluster pairs Σ C(n_ck, 2), same-cluster pairs Σ_k C(n_k, 2), same-class Σ_c."""
    table = contingency_matrix(labels, clusters, sparse=True)

    def pairs(counts: np.ndarray) -> float:
        counts = np.asarray(counts, dtype=np.float64).ravel()
        return float((counts * (counts - 1)).sum() / 2)

    both = pairs(table.data)
    if both == 0:
        return 0.0
    precision, recall = both / pairs(table.sum(axis=0)), both / pairs(table.sum(axis=1))
    return 2 * precision * recall / (precision + recall)


def _resolve_backend(backend: Backend, device: torch.device, work: int = 0, dim: int = 0) -> str:
    """``faiss-gpu`` (CUDA inputs, faiss built with GPUs), ``faiss-cpu`` or ``torch``; ``auto`` on the CPU
    takes the faster of faiss and torch on this machine for searches of more than AUTO_PROBE_MIN_WORK
    query × gallery pairs (``work``)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        problem = faiss_gpu_problem(device)
        if problem is None:
            return "faiss-gpu"
        # searching on the GPU with torch beats copying to the CPU for faiss
        _note_no_faiss_gpu(problem, "torch" if backend == "auto" else "faiss-cpu")
        if backend == "auto":
            return "torch"
    if backend == "auto" and work > AUTO_PROBE_MIN_WORK:
        return _faster_cpu_backend(dim)
    return "faiss-cpu"


@functools.cache
def _faster_cpu_backend(dim: int) -> str:
    """``faiss-cpu`` or ``torch``, whichever searches a probe of this dimension faster on this machine.

    Which one wins depends on the CPU and the BLAS each links (faiss's flat search spends most of its time
    in its top-k heaps; torch's in its GEMM; torch was 1.5x faster on our CI machine). Both give
    identical results (the final ranking is recomputed exactly), so the choice changes only the speed.
    """
    gen = torch.Generator().manual_seed(0)
    gallery = _unit(torch.randn(AUTO_PROBE_SIZE, dim, generator=gen))
    query = gallery[: AUTO_PROBE_SIZE // 4]
    seconds = {}
    for impl in ("faiss-cpu", "torch", "faiss-cpu", "torch"):  # second round: warm caches and threads
        start = time.perf_counter()
        _search(query, gallery, 16, "cosine", impl)
        seconds[impl] = time.perf_counter() - start
    return min(seconds, key=seconds.__getitem__)


@functools.cache
def _gpu_resources() -> Any:
    return faiss.StandardGpuResources()


def faiss_gpu_problem(device: torch.device) -> str | None:
    """Why faiss cannot search CUDA tensors on ``device`` (None when it can), probed once per device."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    return _probe_faiss_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _probe_faiss_gpu(index: int) -> str | None:
    """One tiny ``knn_gpu`` search on GPU ``index``: the faiss package may have no GPU part (faiss-cpu),
    or one built for a CUDA the driver or torch's runtime does not work with (see the README)."""
    try:
        if not hasattr(faiss, "knn_gpu") or faiss.get_num_gpus() == 0:
            return "the installed faiss has no GPU support (faiss-cpu, or a faiss GPU build that sees no GPU)"
        from faiss.contrib import torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)

        x = torch.eye(2, 8, device=torch.device("cuda", index))
        faiss.knn_gpu(_gpu_resources(), x, x, 1, metric=faiss.METRIC_INNER_PRODUCT, device=index)
        torch.cuda.synchronize(index)
    except Exception as e:  # whatever failed, faiss cannot search on this GPU: say why, search without it
        return f"faiss's GPU search failed on cuda:{index} ({type(e).__name__}: {e})"
    return None


@functools.cache
def _note_no_faiss_gpu(problem: str, instead: str) -> None:
    """Log once per reason and replacement that evaluation of CUDA embeddings does not use faiss-gpu."""
    where = "torch's GEMM + top-k on the GPU" if instead == "torch" else "faiss on the CPU (copied there)"
    log.info("evaluation: %s; CUDA embeddings are searched with %s", problem, where)


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Disable TF32 while scoring: its 10-bit mantissa would break the error bound of the search."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _as_float_tensor(x: Any) -> torch.Tensor:
    """A contiguous float32 tensor on the input's device (zero-copy for float32 input)."""
    return torch.as_tensor(x).detach().float().contiguous()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _cat(a: Any, b: Any) -> torch.Tensor:
    ta, tb = _as_float_tensor(a), _as_float_tensor(b)
    return torch.cat([ta, tb.to(ta.device)])


def _labels_numpy(labels: Any, embeddings: Any, name: str) -> np.ndarray:
    """Labels as a 1-D numpy array (ints, or strings such as In-Shop ids), one per row of ``embeddings``."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or len(arr) != len(embeddings):
        raise ValueError(f"{name} has {len(embeddings)} rows but its labels have shape {arr.shape}")
    return arr
