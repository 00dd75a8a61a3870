"""End-to-end training through `run(config)` and `dmlh run`: determinism, outputs, errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness import config
from harness.cli import main
from harness.errors import NonFiniteLossError
from harness.learner import param_groups
from harness.train import run

TINY = {
    "name": "tiny",
    "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
    "sampler": {"p": 3, "k": 4, "batches_per_epoch": 3},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
    "model": {"name": "embedder", "embedding_dim": 8},
    "loss": {"name": "triplet", "mining": "batch_hard"},
    "train": {"epochs": 2},
    "eval": {"nmi": False},
}


def tiny(*overrides: str) -> config.RunConfig:
    return config.validate(config.apply_overrides(config.name_default_components(TINY), list(overrides)))


def test_same_config_and_seed_give_identical_results() -> None:
    a, b = run(tiny()), run(tiny())
    assert a.metrics == b.metrics
    assert [r["train/loss"] for r in a.history] == [r["train/loss"] for r in b.history]
    c = run(tiny("seed=1"))
    assert [r["train/loss"] for r in c.history] != [r["train/loss"] for r in a.history]


def test_result_has_val_test_and_history() -> None:
    res = run(tiny("train.epochs=3"))
    for split in ("val", "test", "test_last"):
        for metric in ("recall@1", "recall@8", "map@r", "r_precision", "precision@1"):
            assert 0.0 <= res.metrics[f"{split}/{metric}"] <= 1.0
    assert len(res.history) == 3 and 1 <= res.best_epoch <= 3
    assert {"epoch", "lr", "train/loss", "val/recall@1"} <= set(res.history[0])
    assert res.config["loss"]["margin"] is not None  # resolved defaults are part of the result


def test_validation_selects_the_checkpoint() -> None:
    res = run(tiny("train.epochs=3"))
    best = max(res.history, key=lambda r: r["val/recall@1"])
    assert res.best_epoch == best["epoch"]
    assert res.metrics["val/recall@1"] == best["val/recall@1"]


def test_nan_loss_is_a_clear_error() -> None:
    with pytest.raises(NonFiniteLossError, match="optimizer.lr"):
        run(tiny("optimizer.lr=1e30", "optimizer.name=sgd", "train.epochs=3", "model.normalize=none"))


def test_param_groups_follow_multipliers() -> None:
    cfg = tiny("train.backbone_lr_mult=0.1", "optimizer.lr=0.01")
    from harness.model import build_model

    model = build_model(cfg, num_classes=4, in_channels=1)
    next(model.head.parameters()).lr_mult = 10.0
    groups = {g["name"]: g["lr"] for g in param_groups(model, [], cfg)}
    assert groups["backbone"] == pytest.approx(0.001)
    assert groups["head×10"] == pytest.approx(0.1)


def test_cli_run_writes_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    argv = ["--results", str(tmp_path / "res"), "run", str(path), "train.epochs=1", "--name", "r1", "seed=3"]
    assert main(argv) == 0  # overrides before and after the options
    out = capsys.readouterr().out
    assert "recall@1" in out
    run_dir = tmp_path / "res" / "runs" / "r1"
    assert {"config.yaml", "metrics.json", "history.csv", "diagnostics.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["seed"] == 3
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/recall@1"] >= 0


def test_cli_bad_config_exits_2_with_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "loss": {"name": "triplett"}}))
    assert main(["run", str(path), "train.epochz=1"]) == 2
    err = capsys.readouterr().err
    assert "loss.name" in err and "'triplet'" in err and "train.epochz" in err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--nmae", "x"])
    assert "unrecognized arguments: --nmae x" in capsys.readouterr().err


def test_checkpoint_restores_the_best_state(tmp_path: Path) -> None:
    res = run(tiny())
    from harness.model import build_model

    model = build_model(tiny(), num_classes=9, in_channels=1)
    model.load_state_dict(res.checkpoint["model"])
    assert torch.equal(model.head.weight, res.checkpoint["model"]["head.weight"])


def test_the_training_step_never_reads_a_tensor_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """50 steps of the trainer's loop: the loss statistics stay on the device and are read once per
    READ_EVERY steps (and at the epoch's end); every other host read by the engine (``.item()``,
    ``.tolist()``, ``float()``, ``bool()`` of a tensor, ``.cpu()``, ``.numpy()`` in harness/) is counted and
    must not happen: on a GPU each would stall the step. Plugins may take CPU-only shortcuts (distances'
    near-duplicate search); the cuda-marked test in test_gpu_options checks everything with torch's sync
    debug mode."""
    from harness import monitor, train

    reads: list[str] = []
    in_step = [False]

    def counting(name: str) -> None:
        real = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            caller = sys._getframe(1).f_code.co_filename  # the engine's reads: torch's own (an optimizer's
            if in_step[0] and f"{os.sep}harness{os.sep}" in caller:  # step counter on the host) are not
                reads.append(f"{name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        counting(name)
    real_read = monitor.StepStats.read
    allowed = [0]

    def read_stats(self: monitor.StepStats) -> dict[str, float]:
        in_step[0] = False  # the interval's one read
        allowed[0] += 1
        try:
            return real_read(self)
        finally:
            in_step[0] = True

    monkeypatch.setattr(monitor.StepStats, "read", read_stats)
    real_epoch = train._Trainer.train_epoch

    def epoch(self: train._Trainer, *args: object) -> dict[str, float]:
        in_step[0] = True
        try:
            return real_epoch(self, *args)  # type: ignore[arg-type]
        finally:
            in_step[0] = False

    monkeypatch.setattr(train._Trainer, "train_epoch", epoch)
    res = run(tiny("sampler.batches_per_epoch=50", "train.epochs=1", "data.num_workers=0"))
    assert reads == [], f"{len(reads)} host reads in 50 steps: {sorted(set(reads))}"
    assert allowed[0] == 50 // monitor.READ_EVERY + 1
    assert res.history[0]["train/loss"] > 0


def test_step_stats_average_on_the_device_and_name_the_first_non_finite_step() -> None:
    from harness.monitor import StepStats

    meter = StepStats(epoch=2)
    for step, loss in enumerate([1.0, 3.0, 2.0]):
        meter.add(step, torch.tensor(loss), {"a": torch.tensor(2 * loss), "b": 0.5})
    assert meter.read() == {"loss": 2.0, "a": 4.0, "b": 0.5}
    meter.add(3, torch.tensor(float("nan")), {"a": torch.tensor(7.0), "b": 0.5})
    meter.add(4, torch.tensor(float("inf")), {"a": torch.tensor(8.0), "b": 0.5})  # not the first
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 3, step 4 \(components: a=7, b=0.5"):
        meter.read()
