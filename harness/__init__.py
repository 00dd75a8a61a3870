"""dml-harness: the engine (registry, config, data, training, evaluation, studies, reports)."""

__version__ = "0.1.0"
