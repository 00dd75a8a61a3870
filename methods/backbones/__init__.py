"""Backbones with named stages (each module registers itself; found by ``methods``)."""
