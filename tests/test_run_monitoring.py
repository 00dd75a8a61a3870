"""Long runs you can follow and trust (issues #15, #10): progress lines in a log file, per-epoch speed in
history.csv, collapse warnings, no silent overwrite, atomic run records, quiet broken pipes."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_train import TINY, tiny

from harness import monitor, rundir
from harness.cli import main
from harness.errors import HarnessError
from harness.monitor import CollapseCheck, embedding_stats
from harness.train import run


def test_redirected_run_logs_epoch_lines_and_history_has_speed(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    log = tmp_path / "out.log"
    with log.open("w") as f:  # no terminal: tqdm is off, logging must say what happens
        done = subprocess.run(
            [sys.executable, "-m", "harness.cli", "--results", str(tmp_path / "res"), "run", str(path)]
            + ["data.val_fraction=0", "train.epochs=2", "--name", "r"],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    lines = [x for x in text.splitlines() if "images/s" in x]
    assert len(lines) == 2 and "epoch 1/2" in lines[0] and "epoch 2/2" in lines[1], text
    assert "remaining ~" in lines[0] and "elapsed" in lines[0]
    assert "no validation split (data.val_fraction: 0): the last epoch (2) is reported" in text
    assert "test_last" not in text and "best epoch" not in text
    run_dir = tmp_path / "res" / "runs" / "r"
    hist = pd.read_csv(run_dir / "history.csv")
    assert {"train_s", "eval_s", "images_per_s", "seconds"} <= set(hist.columns)
    assert (hist.train_s > 0).all() and (hist.eval_s == 0).all()  # no validation split: no eval time
    images = TINY["sampler"]["p"] * TINY["sampler"]["k"] * TINY["sampler"]["batches_per_epoch"]
    assert hist.images_per_s.to_numpy() == pytest.approx(images / hist.train_s.to_numpy())
    assert json.loads((run_dir / "metrics.json").read_text())["selection"] == "last"


def test_validation_time_is_recorded_per_epoch() -> None:
    res = run(tiny("train.epochs=2", "train.eval_every=2"))
    assert res.history[0]["eval_s"] == 0.0 and res.history[1]["eval_s"] > 0
    assert res.selection == "best_val" and res.warnings == []


def test_progress_lines_within_an_epoch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(monitor, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="harness"):
        run(tiny("train.epochs=1"))
    steps = [r.getMessage() for r in caplog.records if r.name == "harness.monitor"]
    assert [s.split("step ")[1].split(":")[0] for s in steps] == ["1/3", "2/3", "3/3"], steps
    assert all("images/s" in s and "remaining ~" in s for s in steps)


def test_embedding_stats_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(10, 5, generator=g), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    pos, neg = [], []
    for i in range(10):
        for j in range(10):
            d = float(torch.sqrt(((emb[i] - emb[j]) ** 2).sum()))
            if labels[i] == labels[j] and i != j:
                pos.append(d)
            elif labels[i] != labels[j]:
                neg.append(d)
    stats = embedding_stats(emb, labels)
    assert stats["embed/pos_dist"] == pytest.approx(sum(pos) / len(pos), rel=1e-5)
    assert stats["embed/neg_dist"] == pytest.approx(sum(neg) / len(neg), rel=1e-5)
    assert stats["embed/norm"] == pytest.approx(float(sum(e.norm() for e in emb)) / 10, rel=1e-5)
    assert math.isnan(embedding_stats(emb[:3], torch.arange(3))["embed/pos_dist"])  # no same-class pair


def _row(epoch: int, emb: torch.Tensor, labels: torch.Tensor, loss: float) -> dict[str, float]:
    stats = {f"train/{k}": v for k, v in embedding_stats(emb, labels).items()}
    return {"epoch": epoch, "train/loss/metric": loss, **stats}


def test_collapse_check_flags_identical_and_zero_embeddings_not_healthy_ones() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    healthy = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    same = torch.nn.functional.normalize(torch.ones(4, 8) + 1e-3 * torch.randn(4, 8), dim=1)
    check = CollapseCheck(margin=0.2)
    assert check.update(_row(1, healthy, labels, 0.5)) is None
    reason = check.update(_row(2, same, labels, 0.2))
    assert reason is not None and "nearly the same point" in reason and "pinned at loss.margin" in reason
    assert "all zero" in (check.update(_row(3, torch.zeros(4, 8), labels, 0.2)) or "")
    assert check.collapsed(3) and "still at the last" in check.warnings(3)[0]
    assert check.update(_row(4, healthy, labels, 0.5)) is None
    assert not check.collapsed(4) and "recovered" in check.warnings(4)[0]
    assert CollapseCheck().warnings(4) == []


def test_a_learning_rate_that_collapses_the_model_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="harness"):
        res = run(tiny("optimizer.lr=1.0", "train.epochs=3"))
    assert any("embedding collapsed" in r.getMessage() for r in caplog.records)
    assert res.metrics["train/collapsed"] == 1.0 and "collapsed" in res.warnings[0]
    assert "WARNING: embedding collapsed" in rundir.format_metrics(res)
    saved = json.loads((rundir.write_run(res, tmp_path / "r") / "metrics.json").read_text())
    assert saved["collapsed"] is True and saved["warnings"] == res.warnings
    assert run(tiny("train.epochs=3")).metrics["train/collapsed"] == 0.0


def test_run_refuses_to_replace_results_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    argv = ["--results", str(tmp_path), "run", str(path), "train.epochs=1", "--name", "r"]
    assert main(argv) == 0
    first = (tmp_path / "runs" / "r" / "metrics.json").read_text()
    assert main([*argv, "seed=5"]) == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "runs" / "r" / "metrics.json").read_text() == first
    assert main([*argv, "seed=5", "--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())["seed"] == 5


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    return run(tiny("train.epochs=1"))


@pytest.mark.parametrize("target", ["history", "embeddings", "marker"])
def test_a_full_disk_leaves_no_run_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result, target: str  # type: ignore[no-untyped-def]
) -> None:
    old = rundir.write_run(result, tmp_path / "runs" / "old")
    before = (old / "metrics.json").read_text()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "history":
        monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    elif target == "embeddings":
        monkeypatch.setattr(rundir.embeddings, "write", full)
    else:
        monkeypatch.setattr(rundir, "_fsync", lambda p: full() if p.name == rundir.COMPLETE else None)
    for name in ("new", "old"):  # a fresh run, and a rerun over a complete one
        with pytest.raises(HarnessError, match="No space left"):
            rundir.write_run(result, tmp_path / "runs" / name)
    assert not (tmp_path / "runs" / "new").exists()
    assert rundir.is_complete(old) and (old / "metrics.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["old"]  # no temporary folders left


def test_list_into_a_closed_pipe_exits_quietly() -> None:
    done = subprocess.run(
        f"{sys.executable} -m harness.cli list | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 1


def test_symmetrical_synthesis_without_effect_is_a_warning_and_a_metric() -> None:
    """α = 1 reflects a point onto its classmate: no reflection ever beats the originals, so the run is the
    loss alone (seen in the Fashion-MNIST α×β study); α = 2 synthesises hard negatives and is not flagged."""
    synthesis = ("synthesis.name=symmetrical", "sampler.p=2", "sampler.k=8")
    inert = run(tiny(*synthesis, "synthesis.alpha=1.0"))
    assert inert.metrics["train/synthesis_inert"] == 1.0
    assert any("symmetrical synthesis had no effect: in all 2 epochs" in w for w in inert.warnings)
    assert all(h["diag/synthetic_hard_fraction"] == 0 for h in inert.history)
    working = run(tiny(*synthesis))
    assert working.metrics["train/synthesis_inert"] == 0.0 and working.warnings == []
    assert "train/synthesis_inert" not in run(tiny()).metrics  # no synthesis: no flag


def test_inert_synthesis_needs_every_epoch_at_zero() -> None:
    zero = {"diag/synthetic_hard_fraction": 0.0, "diag/synthetic_entry_fraction": 0.0}
    assert monitor.inert_synthesis([zero, zero]) is not None
    assert monitor.inert_synthesis([zero, {**zero, "diag/synthetic_entry_fraction": 0.1}]) is None
    assert monitor.inert_synthesis([zero, {"epoch": 2}]) is None  # an epoch without the diagnostic
    assert monitor.inert_synthesis([]) is None


def test_a_run_folder_is_readable_by_colleagues_as_the_umask_says(tmp_path: Path, result) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        out = rundir.write_run(result, tmp_path / "runs" / "shared")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 before: only the owner could read it
