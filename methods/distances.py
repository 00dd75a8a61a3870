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


class _SquaredEuclidean(torch.autograd.Function):
    """``|x_i|² + |x_j|² - 2 x_iᵀx_j`` (unclamped) in one addmm; backward ``2 (x·rowsum(S) - S x)`` with
    ``S = G + Gᵀ``: one matmul, where autograd would need two."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        norms = x.pow(2).sum(1)
        return torch.addmm(norms[:, None] + norms[None, :], x, x.T, alpha=-2.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        sym = grad + grad.T
        return torch.addmm(x * sym.sum(1, keepdim=True), sym, x, alpha=-1.0).mul_(2.0)


def squared_euclidean(x: Tensor, y: Tensor | None = None) -> Tensor:
    """[N, M] squared Euclidean distances ``|x_i|² + |y_j|² - 2 x_iᵀy_j``, clamped at 0 (one matmul)."""
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


def paired_distance(x: Tensor, i: Tensor, j: Tensor, metric: Distance) -> Tensor:
    """``metric(x_i[k], x_j[k])`` for index vectors i, j: the same values as ``pairwise_distance(x)[i, j]``
    computed from the rows alone, so the backward costs O(pairs × D) instead of a B×B matmul."""
    if metric == "cosine":
        xn = F.normalize(x, dim=1)
        return 1.0 - (xn[i] * xn[j]).sum(1)
    sq = (x[i] - x[j]).pow(2).sum(1)
    return sq.clamp_min(SQRT_CLAMP).sqrt() if metric == "euclidean" else sq


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
