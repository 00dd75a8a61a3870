"""Pairwise distances, label masks and masked reductions shared by the pair-based losses and miners.

Everything here works on a whole batch at once ([B, B] matrices, boolean masks): no Python loop over
pairs or triplets. Distances are computed in float32 (float64 inputs stay float64, for gradcheck) with
autocast disabled, because bfloat16 distances lose the small differences the losses are made of.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

#: Distances a loss or miner can rank with. "cosine" is the cosine distance 1 - cos(x, y).
Distance = Literal["euclidean", "sqeuclidean", "cosine"]

#: Squared distances are clamped at this value before the square root, so that the distance of an
#: embedding to itself (or to a duplicate) has a finite, zero gradient instead of NaN.
SQRT_CLAMP = 1e-12

_T = TypeVar("_T")


class HardNegativeSource(Protocol):
    """What the pair-based losses need from a synthesis (methods/synthesis.py): a [B, B] matrix of
    ``metric`` whose negative entries are the hardest over the original negative and its synthetics."""

    def hardest_negatives(self, embeddings: Tensor, labels: Tensor, metric: str) -> Tensor: ...


@runtime_checkable
class PairNegativeSource(Protocol):
    """A synthesis that also scores negative *pairs* (Symm's rule, methods/synthesis.py): per anchor and
    same-class pair, the candidates ``(values [B, Q, C], labels [Q])`` and the hardest of them
    ``(values [B, Q], labels [Q])``."""

    def pair_negative_candidates(
        self, embeddings: Tensor, labels: Tensor, metric: str
    ) -> tuple[Tensor, Tensor]: ...

    def hardest_pair_negatives(
        self, embeddings: Tensor, labels: Tensor, metric: str
    ) -> tuple[Tensor, Tensor]: ...


def full_precision(forward: Callable[..., _T]) -> Callable[..., _T]:
    """Decorator for ``forward(self, embeddings, labels, ...)``: autocast off, half inputs upcast to float32.

    The loss value comes out in float32; autograd casts the gradient back to the input's dtype. ``labels``
    may be omitted where the forward does not need them (regularizers such as MDR).
    """

    @functools.wraps(forward)
    def wrapper(self: Any, embeddings: Tensor, labels: Tensor | None = None, *args: Any, **kwargs: Any) -> _T:
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()
        if not torch.is_autocast_enabled(embeddings.device.type):  # entering the context costs µs per call
            return forward(self, embeddings, labels, *args, **kwargs)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return forward(self, embeddings, labels, *args, **kwargs)

    return wrapper


class _Gram(torch.autograd.Function):
    """``x xᵀ`` whose backward is one matmul, ``(G + Gᵀ) x``, where autograd's ``x @ x.T`` needs two."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.T) @ x


#: Off-diagonal squared distances of a batch below this fraction of its largest ``2 |c_i|²`` (c: the centred
#: embeddings) are recomputed from the rows: there the matmul form's rounding error (~1e-7 of the norms in
#: float32) is no longer small against the value.
NEAR_ZERO = 1e-3
#: On a GPU, candidates for that per image of the batch: the ``NEAR_CANDIDATES·B`` smallest off-diagonal
#: entries are checked (a fixed number, so finding them never reads the matrix back to the host: no stall).
#: A P×K batch that pads a 2-image class with repeats has one or a few duplicates per image.
NEAR_CANDIDATES = 4


def _near_pairs(out: Tensor, threshold: Tensor, fixed_size: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, columns and a mask of the off-diagonal entries of ``out`` (diagonal at +inf) to recompute:
    exactly those below ``threshold`` (on the CPU: a host read costs nothing there, and a well-spread batch
    has none), or with ``fixed_size`` (on a GPU) the ``NEAR_CANDIDATES·B`` smallest, masked by it."""
    n = len(out)
    if not fixed_size:
        if out.amin() > threshold:
            none = torch.zeros(0, dtype=torch.long)
            return none, none, torch.zeros(0, dtype=torch.bool)
        i, j = (out <= threshold).nonzero(as_tuple=True)
        return i, j, torch.ones_like(i, dtype=torch.bool)
    smallest, index = out.view(-1).topk(min(NEAR_CANDIDATES * n, n * n - n), largest=False)
    return index // n, index % n, smallest <= threshold


class _SquaredEuclidean(torch.autograd.Function):
    """Squared distances within a batch, ``|c_i|² + |c_j|² - 2 c_iᵀc_j`` (unclamped) in one addmm on the
    centred embeddings ``c = x - mean(x)`` (the same distances, less rounding error when the batch sits away
    from the origin); backward ``2 (c·rowsum(S) - S c)`` with ``S = G + Gᵀ``: one matmul, where autograd
    would need two (the centring is a constant shift: the gradient passes through unchanged).

    The diagonal is exactly 0 (a constant: no gradient), and off-diagonal entries below ``NEAR_ZERO``
    (``_near_pairs``) are ``|c_i - c_j|²`` from the rows, value and gradient: duplicate embeddings are at
    distance 0 with zero gradient, near-duplicates at their exact distance, as a per-pair computation gives
    them. On a GPU this is fixed-size tensor work: no host read, no branch on data.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        c = x - x.mean(0, keepdim=True)
        norms = c.pow(2).sum(1)
        out = torch.addmm(norms[:, None] + norms[None, :], c, c.T, alpha=-2.0)
        out.diagonal().fill_(float("inf"))  # never a candidate
        i, j, near = _near_pairs(out, NEAR_ZERO * 2.0 * norms.max(), fixed_size=x.device.type != "cpu")
        out[i, j] = torch.where(near, (c[i] - c[j]).pow(2).sum(1), out[i, j])
        out.diagonal().zero_()
        ctx.save_for_backward(c, i, j, near)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        c, i, j, near = ctx.saved_tensors
        # the recomputed entries: their gradient from the rows, not through the matmul form
        at = grad[i, j]
        g = (at * near)[:, None] * (c[i] - c[j])
        grad = grad.index_put((i, j), torch.where(near, torch.zeros_like(at), at))
        sym = grad + grad.T
        sym.diagonal().zero_()
        out = torch.addmm(c * sym.sum(1, keepdim=True), sym, c, alpha=-1.0)
        out.index_add_(0, i, g).index_add_(0, j, -g)
        return out.mul_(2.0)


def squared_euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """[N, M] squared Euclidean distances ``|x_i|² + |y_j|² - 2 x_iᵀy_j``, clamped at 0 (one matmul).

    For y None (a batch against itself): exact on the diagonal and for near-duplicates
    (``_SquaredEuclidean``).
    """
    if y is None:
        return _SquaredEuclidean.apply(x).clamp_min(0.0)
    return torch.addmm(x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :], x, y.T, alpha=-2.0).clamp_min(0.0)


def cosine_similarity(x: Tensor, y: Tensor | None = None) -> Tensor:
    """[N, M] cosine similarities of the rows of x and y (for y = None with a one-matmul backward)."""
    xn = F.normalize(x, dim=1)
    return _Gram.apply(xn) if y is None else xn @ F.normalize(y, dim=1).T


def pairwise_distance(x: Tensor, metric: Distance, y: Tensor | None = None) -> Tensor:
    """[N, M] matrix of ``metric`` between the rows of x (and y, default x).

    euclidean: ``sqrt(max(d², 1e-12))`` (finite gradient at zero distance); sqeuclidean: d²;
    cosine: ``1 - cos``.
    """
    if metric == "euclidean":
        return squared_euclidean(x, y).clamp_min(SQRT_CLAMP).sqrt()
    if metric == "sqeuclidean":
        return squared_euclidean(x, y)
    if metric == "cosine":
        return 1.0 - cosine_similarity(x, y)
    raise ValueError(f"unknown distance {metric!r}; expected euclidean, sqeuclidean or cosine")


def distance_matrix(
    embeddings: Tensor, labels: Tensor, metric: Distance, synthesis: HardNegativeSource | None = None
) -> Tensor:
    """[B, B] distances; with a synthesis, each negative entry is the hardest over its synthetics.

    The synthesis speaks of similarities for "cosine", so its matrix is turned into ``1 - cos``.
    """
    if synthesis is None:
        return pairwise_distance(embeddings, metric)
    out = synthesis.hardest_negatives(embeddings, labels, metric).to(embeddings.dtype)
    return 1.0 - out if metric == "cosine" else out


def pair_negative_distances(
    embeddings: Tensor, labels: Tensor, metric: Distance, synthesis: PairNegativeSource, hardest: bool = True
) -> tuple[Tensor, Tensor]:
    """Distances from each embedding to the hardest candidate of each same-class pair [B, Q] (to each of
    its candidates [B, Q, C] with ``hardest=False``), and the pairs' labels [Q]."""
    source = synthesis.hardest_pair_negatives if hardest else synthesis.pair_negative_candidates
    out, pair_labels = source(embeddings, labels, metric)
    out = out.to(embeddings.dtype)
    return (1.0 - out if metric == "cosine" else out), pair_labels


def similarity_matrix(
    embeddings: Tensor, labels: Tensor, synthesis: HardNegativeSource | None = None
) -> Tensor:
    """[B, B] cosine similarities; with a synthesis, negatives are the hardest (largest) over synthetics."""
    if synthesis is None:
        return cosine_similarity(embeddings)
    return synthesis.hardest_negatives(embeddings, labels, "cosine").to(embeddings.dtype)


def label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean [B, B] masks: positives (same label, not the same image) and negatives (other label)."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device), ~same


def pair_masks(indices: tuple[Tensor, ...], size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Boolean [size, size] positive / negative masks from a miner's pairs ``(a1, p, a2, n)``."""
    a1, p, a2, n = indices
    pos = torch.zeros(size, size, dtype=torch.bool, device=device)
    neg = torch.zeros_like(pos)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


#: Exponents are clamped at this value: ``exp`` of very negative numbers (denormal results) is ~10-30x
#: slower on CPU, and a term below e^-80 relative to the row maximum changes nothing in float32 or float64.
_MIN_EXPONENT = -80.0


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = 1, add_one: bool = False) -> Tensor:
    """``log Σ_{mask} exp(x)`` along ``dim`` (``log(1 + Σ ...)`` with add_one); 0 where the mask is empty.

    Stable (the masked maximum is subtracted; excluded entries, possibly larger, are zeroed before exp)
    and NaN-free in value and gradient, empty rows included.
    Masks by arithmetic: on CPU ``where`` / ``masked_fill`` are several times slower than a multiply.
    """
    keep = mask.to(x.dtype)
    nonempty = keep.amax(dim, keepdim=True)
    with torch.no_grad():
        top = torch.addcmul(x, 1.0 - keep, x.new_tensor(-1e30)).amax(dim, keepdim=True) * nonempty
        if add_one:
            top.clamp_min_(0.0)  # the "1" is e^0
    total = (torch.exp(((x - top) * keep).clamp_min(_MIN_EXPONENT)) * keep).sum(dim, keepdim=True)
    if add_one:
        total = total + torch.exp(-top)
    return ((torch.log(total + (1.0 - nonempty)) + top) * nonempty).squeeze(dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of the finite tensor x over ``mask`` (0 for an empty mask, still attached to the graph)."""
    keep = mask.to(x.dtype)
    return (x * keep).sum() / keep.sum().clamp_min(1.0)
