"""The clustering F1 in a run: recorded like NMI, and valid as ``train.selection_metric``."""

from __future__ import annotations

import pytest

from harness import config
from harness.errors import ConfigError
from harness.train import run

TINY = {
    "name": "tiny_f1",
    "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
    "sampler": {"p": 3, "k": 4, "batches_per_epoch": 2},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
    "model": {"name": "embedder", "embedding_dim": 8},
    "loss": {"name": "triplet", "mining": "batch_hard"},
    "train": {"epochs": 2, "selection_metric": "f1"},
}


def test_f1_is_a_valid_selection_metric_only_with_eval_nmi() -> None:
    assert config.validate({"train": {"selection_metric": "f1"}}).train.selection_metric == "f1"
    with pytest.raises(ConfigError, match="clustering metrics need eval.nmi: true"):
        config.validate({"train": {"selection_metric": "f1"}, "eval": {"nmi": False}})


def test_run_selected_by_f1_records_f1_like_nmi() -> None:
    res = run(config.validate(config.name_default_components(TINY)))
    for split in ("val", "test", "test_last"):
        for metric in ("f1", "nmi"):
            assert 0.0 <= res.metrics[f"{split}/{metric}"] <= 1.0
    assert all("val/f1" in row for row in res.history)
