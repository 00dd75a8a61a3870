"""Every loss and every seed method trains end to end through `dmlh run`'s code path on real data
(digits, Fashion-MNIST) at CPU scale, and the big backbones take a training step on a CUB-layout fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import config, registry
from harness.train import run

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _cfg(dataset: dict, **sections: object) -> config.RunConfig:
    small = dataset["name"] == "digits"
    raw = {
        "name": "e2e",
        "data": {"dataset": dataset},
        "sampler": {"p": 3, "k": 4, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8 if small else 28},
        "model": {"name": "embedder", "embedding_dim": 16},
        "train": {"epochs": 1},
        "eval": {"nmi": False, "ks": [1, 2]},
        **sections,
    }
    return config.validate(raw)


DATASETS = [
    pytest.param({"name": "digits"}, id="digits"),
    pytest.param(
        {"name": "fashion_mnist", "max_per_class": 30},
        id="fashion_mnist",
        marks=pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist"),
    ),
]


def _check(result) -> None:  # noqa: ANN001
    assert 0.0 <= result.metrics["test/recall@1"] <= 1.0
    assert all(v == v for v in result.history[-1].values() if isinstance(v, float))  # no NaN


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("loss", registry.registry("loss").names())
def test_every_loss_trains(dataset: dict, loss: str) -> None:
    _check(run(_cfg(dataset, loss={"name": loss})))


METHODS = {
    "symmetrical_synthesis": {"loss": {"name": "triplet"}, "synthesis": {"name": "symmetrical"}},
    "mdr": {
        "model": {"name": "embedder", "embedding_dim": 16, "normalize": "mean_distance"},
        "loss": {"name": "triplet", "mining": "batch_hard"},
        "regularizers": [{"name": "mdr", "levels": [-3, 0, 3], "weight": 0.6}],
        "eval": {"nmi": False, "ks": [1, 2], "distance": "euclidean"},
    },
    "abe": {
        "model": {"name": "abe", "m": 2, "embedding_dim": 16, "lambda_div": 1.0},
        "loss": {"name": "contrastive"},
    },
    "abe_heads": {"model": {"name": "abe", "m": 2, "embedding_dim": 16, "variant": "heads"}},
    "gem": {"pooling": {"name": "gem"}},
    "rmac": {"pooling": {"name": "rmac"}},
    "cgd": {
        "pooling": {"name": "cgd", "descriptors": "SG", "dim": 16},
        "model": {"name": "embedder", "head": False},
    },
    "pca_whitening": {"eval": {"nmi": False, "ks": [1, 2], "whitening": {"name": "pca"}}},
    "distance_weighted_miner": {"loss": {"name": "triplet"}, "miner": {"name": "distance_weighted"}},
}


@pytest.mark.parametrize("dataset", DATASETS[1:])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_fashion_mnist(dataset: dict, method: str) -> None:
    result = run(_cfg(dataset, **METHODS[method]))
    _check(result)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["googlenet", "bn_inception", "resnet50"])
def test_big_backbones_take_a_step_on_cub_layout(tmp_path: Path, backbone: str) -> None:
    from tests.fixtures import make_cub200

    root = make_cub200(tmp_path / "CUB_200_2011")
    cfg = config.validate(
        {
            "data": {
                "dataset": {"name": "cub200", "root": str(root), "train_classes": 2},
                "val_fraction": 0.0,
                "input_size": 64,
                "resize_size": 72,
            },
            "sampler": {"p": 2, "k": 2, "batches_per_epoch": 1},
            "backbone": {"name": backbone, "pretrained": False},
            "model": {"name": "embedder", "embedding_dim": 8},
            "train": {"epochs": 1},
            "eval": {"nmi": False, "ks": [1], "batch_size": 4},
        }
    )
    _check(run(cfg))
