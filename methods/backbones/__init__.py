"""Backbones with named stages (each module registers itself)."""

from methods.backbones import bn_inception, googlenet, resnet, small_convnet  # noqa: F401
