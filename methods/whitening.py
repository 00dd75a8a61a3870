"""Learned linear whitening of embeddings at evaluation time (kind ``whitening``), METHODS.md §7.2.

Set in a run config as ``eval.whitening: {name: pca | zca | lw, dim: null, shrinkage: 0.0}`` (or just the
name; ``none``/null = off). The engine fits it on the train-split embeddings only and applies it to
val/test. Every method learns ``x ↦ P (x − m)`` (computed in float64) and, as cirtorch's
``whitenapply``, L2-normalises the result: x / (‖x‖ + 1e-6).

``shrinkage`` λ ∈ [0, 1] blends the covariance being whitened with its scaled identity, Ledoit–Wolf style:
C ← (1 − λ)·C + λ·(tr C / D)·I, which keeps the inverse square root stable when there are few embeddings
per dimension.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from harness.errors import ConfigError, TrainingError
from harness.registry import register
from methods.pooling import l2n


def _descending_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and the matching eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return values.flip(0), vectors.flip(1)


def cholesky_with_jitter(s: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of S + αI with the smallest α in {0, 1e-10, 1e-9, ...} that works (cirtorch)."""
    eye = torch.eye(len(s), dtype=s.dtype, device=s.device)
    for alpha in [0.0] + [10.0**e for e in range(-10, 21)]:
        factor, info = torch.linalg.cholesky_ex(s + alpha * eye)
        if info == 0:
            return factor
    raise TrainingError(
        "whitening: the pair covariance is not positive definite even with 1e20·I added "
        "(are the embeddings finite?)"
    )


#: Output dimensions (all if null) and shrinkage of the covariance towards a scaled identity.
Dim = Annotated[int, Field(ge=1)] | None
Shrinkage = Annotated[float, Field(ge=0, le=1)]


class _LinearWhitening:
    """Shared fit/apply: subclasses learn the projection rows (most important first) from the data."""

    def __init__(self, *, dim: Dim = None, shrinkage: Shrinkage = 0.0):
        self.dim, self.shrinkage = dim, shrinkage
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None

    def shrink(self, cov: torch.Tensor) -> torch.Tensor:
        if self.shrinkage == 0:
            return cov
        target = torch.trace(cov) / len(cov) * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        return (1 - self.shrinkage) * cov + self.shrinkage * target

    def learn(self, x: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """[D_out, D] projection for float64 data ``x`` [N, D] with mean ``mean``."""
        raise NotImplementedError

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> _LinearWhitening:
        """Learn m and P on ``embeddings`` [N, D] (with their class ``labels``)."""
        x = embeddings.detach().double()
        if self.dim is not None and self.dim > x.shape[1]:
            raise ConfigError(f"whitening dim {self.dim} is larger than the embedding dimension {x.shape[1]}")
        self.mean = x.mean(dim=0)
        self.projection = self.learn(x, torch.as_tensor(labels, device=x.device), self.mean)
        return self

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P (x − m) without the final normalisation."""
        if self.mean is None or self.projection is None:
            raise RuntimeError(f"{type(self).__name__} must be fitted before it is applied")
        mean, proj = self.mean.to(x.device), self.projection.to(x.device)
        return ((x.double() - mean) @ proj.T).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(self.project(x))


class _SpectralWhitening(_LinearWhitening):
    """Whitening from the eigendecomposition of the (shrunk) covariance, ``eps`` added to its eigenvalues."""

    def __init__(self, *, dim: Dim = None, shrinkage: Shrinkage = 0.0, eps: float = 1e-9):
        super().__init__(dim=dim, shrinkage=shrinkage)
        self.eps = eps

    def spectrum(self, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``dim`` (all if null) eigenvalues + ``eps`` and eigenvectors of C = (X − m)ᵀ(X − m)/N."""
        xc = x - mean
        values, vectors = _descending_eigh(self.shrink(xc.T @ xc / len(x)))
        return values[: self.dim].clamp_min(0) + self.eps, vectors[:, : self.dim]


@register("whitening", "pca")
class PCAWhitening(_SpectralWhitening):
    """PCA-whitening (cirtorch ``pcawhitenlearn``): P = Λ^(−1/2) Eᵀ, top ``dim`` components (all if null)."""

    def learn(self, x: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        values, vectors = self.spectrum(x, mean)
        return (vectors / values.sqrt()).T


@register("whitening", "zca")
class ZCAWhitening(_SpectralWhitening):
    """ZCA-whitening: P = E Λ^(−1/2) Eᵀ (whitened, then rotated back to the original axes).

    With ``dim`` only the top ``dim`` principal directions are kept (P = E_d Λ_d^(−1/2) E_dᵀ, output still
    D-dimensional).
    """

    def learn(self, x: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        values, vectors = self.spectrum(x, mean)
        return (vectors / values.sqrt()) @ vectors.T


@register("whitening", "lw")
class LwWhitening(_LinearWhitening):
    """Supervised whitening (Mikolajczyk & Matas; cirtorch ``whitenlearn``) from same-class pairs.

    S = mean over all unordered same-class pairs (i, j) of (x_i − x_j)(x_i − x_j)ᵀ (optionally shrunk);
    P₁ = chol(S)⁻¹ (jitter αI added until S + αI is positive definite); then a rotation: the eigenvectors E
    (descending) of the covariance of P₁(X − m), P = Eᵀ P₁, top ``dim`` rows. Every pair of the train split
    is used, summed in closed form per class: Σ_{i<j in c} (x_i − x_j)(x_i − x_j)ᵀ = n_c · Σ_{i in c}
    (x_i − μ_c)(x_i − μ_c)ᵀ.
    """

    def learn(self, x: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        num_pairs = int((counts * (counts - 1) // 2).sum())
        if num_pairs == 0:
            raise ConfigError("whitening lw needs at least two train embeddings of one class")
        n = counts.to(x.dtype)
        centroids = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device)
        centroids.index_add_(0, inverse, x)
        centroids /= n[:, None]
        within = x - centroids[inverse]
        scatter = (within * n[inverse, None]).T @ within  # Σ_c n_c Σ_{i in c} (x_i − μ_c)(x_i − μ_c)ᵀ
        factor = cholesky_with_jitter(self.shrink(scatter / num_pairs))
        p1 = torch.linalg.solve_triangular(
            factor, torch.eye(len(factor), dtype=x.dtype, device=x.device), upper=False
        )
        xw = (x - mean) @ p1.T
        _, vectors = _descending_eigh(xw.T @ xw)
        return (vectors.T @ p1)[: self.dim]
