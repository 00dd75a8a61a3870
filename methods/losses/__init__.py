"""Metric-learning losses. Importing this package registers them (one module per family)."""

from methods.losses import angular, npair, proxy, softmax  # noqa: F401
