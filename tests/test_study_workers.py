"""Where a study ran does not change its numbers (issue #28, item 5): the per-trial CPU thread count and
deterministic kernels are fixed by the study, not by ``--workers``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from joblib.externals.loky import get_reusable_executor

from harness import study
from harness.study.devices import Slot, visible_gpus
from harness.study.runner import trial_threads
from tests.test_study import trials_by_study

#: Two arms on digits, one epoch each: cheap, and big enough that a conv's weight gradient is summed over
#: per-thread partial sums (the arithmetic that moved with the thread count).
DIGITS: dict[str, Any] = {
    "name": "digits2",
    "base": {
        "data": {"dataset": {"name": "digits"}, "val_fraction": 0.2},
        "sampler": {"p": 3, "k": 10, "batches_per_epoch": 4},
        "backbone": {"name": "small_convnet", "width": 8, "input_size": 8},
        "model": {"name": "embedder", "embedding_dim": 16},
        "loss": {"name": "triplet", "mining": "batch_hard"},
        "train": {"epochs": 1},
        "eval": {"nmi": False},
    },
    "arms": {"loss.mining": ["batch_hard", "all"]},
    "final": {"seeds": [0]},
}


def stored_metrics(results: Path) -> dict[str, dict[str, float]]:
    trials = trials_by_study("digits2", results)["digits2"]
    return {t.user_attrs["unit"]: t.user_attrs["metrics"] for t in trials if t.state.name == "COMPLETE"}


@pytest.mark.slow
def test_the_same_study_gives_the_same_numbers_with_one_or_two_workers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: each of N CPU workers trained with cores // N threads, so `--workers 2` summed gradients in
    other partial sums than `--workers 1` and every metric of the study moved."""
    path = tmp_path / "digits2.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    # The study's loky worker process, started and warm (torch and the harness imported) before the study
    # asks for it (loky's executor is reusable), so that it claims the second trial while this process
    # trains the first rather than after this process has run both.
    get_reusable_executor(max_workers=1).submit(visible_gpus).result()
    runs = {}
    for workers in (2, 1):
        with caplog.at_level(logging.WARNING, logger="harness.study.runner"):
            study.run_study(path, workers=workers, results=tmp_path / str(workers), report=False)
        runs[workers] = stored_metrics(tmp_path / str(workers))
    assert len(runs[1]) == 2 and runs[1] == runs[2]  # exact: the same arithmetic, not merely close
    # 2 workers of every core's thread each oversubscribe the cores: said once, with the remedy
    (shared,) = [r.getMessage() for r in caplog.records if "threads per trial" in r.getMessage()]
    assert f"2 CPU workers x {len(os.sched_getaffinity(0))} threads per trial" in shared
    assert "set base.train.threads: " in shared


def test_the_thread_count_is_the_studys_and_gpu_workers_keep_their_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = study.parse_study(DIGITS)
    cpu = [Slot(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="harness.study.runner"):
        assert [trial_threads(spec, cpu[:n], 16) for n in (1, 2, 4)] == [16, 16, 16]  # not 16 // workers
        assert len(caplog.records) == 2  # 2 and 4 workers of 16 threads on 16 cores: one line each run
        caplog.clear()
        pinned = study.parse_study(
            {**DIGITS, "base": {**DIGITS["base"], "train": {"epochs": 1, "threads": 4}}}
        )
        assert trial_threads(pinned, cpu, 16) == 4 and not caplog.records  # 4 x 4 fit the 16 cores
    gpus = [Slot(i, (str(i),)) for i in range(4)]
    assert trial_threads(spec, gpus, 16) == 4  # GPU workers compute on their GPU: a share of the cores each
