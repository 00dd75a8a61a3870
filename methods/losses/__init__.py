"""Metric-learning losses. Importing this package registers them (one module per family)."""

from methods.losses import (  # noqa: F401
    angular,
    contrastive,
    lifted,
    multi_similarity,
    npair,
    proxy,
    softmax,
    triplet,
)
