"""Metric-learning losses, one module per family (each registers itself; found by ``methods``)."""
