"""Backbones with named stages (each module registers itself)."""

from methods.backbones import small_convnet  # noqa: F401
