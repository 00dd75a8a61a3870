"""Whitening: identity covariance on the fitting set (pca, zca), of matching-pair differences (lw)."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness import registry
from harness.errors import ConfigError, TrainingError
from methods.whitening import cholesky_with_jitter


def whitening(name: str, **params: object):  # noqa: ANN201
    return registry.build("whitening", name, path="eval.whitening", **params)


def correlated(n: int = 400, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, d, dtype=torch.float64
    )
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 2.0


def covariance(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    return xc.T @ xc / len(x)


@pytest.mark.parametrize("name", ["pca", "zca"])
def test_identity_covariance_on_fitting_set(name: str) -> None:
    x = correlated()
    w = whitening(name, eps=0.0).fit(x, torch.zeros(len(x)))
    z = w.project(x)
    torch.testing.assert_close(covariance(z), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64))
    out = w(x)  # applied: L2-normalised rows
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(x), dtype=torch.float64), atol=1e-5, rtol=0)


def test_pca_dim_and_zca_is_symmetric() -> None:
    x = correlated()
    pca = whitening("pca", dim=3, eps=0.0).fit(x, torch.zeros(len(x)))
    z = pca.project(x)
    assert z.shape == (len(x), 3)
    torch.testing.assert_close(covariance(z), torch.eye(3, dtype=torch.float64))
    # the kept directions are those of largest variance: their variance before whitening is ≥ the rest
    values = torch.linalg.eigvalsh(covariance(x)).flip(0)
    torch.testing.assert_close(1 / pca.projection.norm(dim=1) ** 2, values[:3])
    zca = whitening("zca").fit(x, torch.zeros(len(x)))
    torch.testing.assert_close(zca.projection, zca.projection.T)


def test_lw_identity_covariance_of_matching_pair_differences() -> None:
    x = correlated(n=120)
    labels = torch.arange(12).repeat_interleave(10)[torch.randperm(120)]
    x = x + 3 * torch.randn(12, 6, dtype=torch.float64)[labels]  # class structure
    w = whitening("lw").fit(x, labels)
    z = w.project(x)
    diffs = torch.stack(
        [z[i] - z[j] for i, j in itertools.combinations(range(len(x)), 2) if labels[i] == labels[j]]
    )
    torch.testing.assert_close(diffs.T @ diffs / len(diffs), torch.eye(6, dtype=torch.float64))
    # the rotation: the whitened data's covariance is diagonal with descending variances
    c = covariance(z)
    torch.testing.assert_close(c, torch.diag(c.diagonal()), atol=1e-9, rtol=0)
    assert (c.diagonal().diff() <= 1e-9).all()
    reduced = whitening("lw", dim=2).fit(x, labels)
    torch.testing.assert_close(reduced.project(x), z[:, :2])


def test_shrinkage_blends_with_scaled_identity() -> None:
    x = correlated()
    full = whitening("pca", shrinkage=1.0, eps=0.0).fit(x, torch.zeros(len(x)))
    cov = covariance(x)
    scale = (torch.trace(cov) / 6) ** -0.5  # λ = 1: whitening by a scalar (an orthogonal P up to scale)
    torch.testing.assert_close(
        full.projection @ full.projection.T, scale**2 * torch.eye(6, dtype=torch.float64)
    )


def test_cholesky_jitter_and_errors() -> None:
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    factor = cholesky_with_jitter(singular)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, singular, atol=1e-6, rtol=0)
    with pytest.raises(TrainingError, match="not positive definite"):
        cholesky_with_jitter(torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ConfigError, match="two train embeddings"):
        whitening("lw").fit(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ConfigError, match="larger than"):
        whitening("pca", dim=9).fit(torch.randn(20, 3), torch.zeros(20))
    with pytest.raises(ConfigError, match="shrinkage"):
        whitening("zca", shrinkage=2.0)


def test_float32_in_float32_out() -> None:
    x = correlated().float()
    w = whitening("pca").fit(x, torch.zeros(len(x)))
    assert w(x[:5]).dtype == torch.float32


def test_full_rank_zca_ranks_as_pca_and_a_reduced_pca_does_not() -> None:
    """ZCA is PCA-whitening rotated back (P_zca = E·P_pca): with every direction kept the applied
    embeddings differ by a rotation, so every distance and ranking is the same (pooling_x_whitening_all
    shows equal PCA and ZCA rows for that reason); with ``dim`` PCA drops directions and ZCA keeps D axes."""
    x, q = correlated(seed=0), correlated(n=50, seed=1)
    fit = {n: whitening(n, eps=0.0).fit(x, torch.zeros(len(x))) for n in ("pca", "zca")}
    pca, zca = (fit[n](q) for n in ("pca", "zca"))
    torch.testing.assert_close(torch.cdist(pca, pca), torch.cdist(zca, zca))
    reduced = whitening("pca", dim=3, eps=0.0).fit(x, torch.zeros(len(x)))(q)
    assert not torch.allclose(torch.cdist(reduced, reduced), torch.cdist(zca, zca), atol=1e-3)
