"""`dmlh study status` (issue #28, item 8): units per arm and stage as finished / running (with the live
worker) / dead (its worker is gone) / queued / failed, read from a real journal store."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from harness import store, study
from harness.cli import main
from harness.reporting.status import status
from harness.study.queue import HOST, WorkQueue, prepare
from tests.test_study import tiny_study, write


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that runs for the test's duration (another worker, as status sees it)."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def rows(text: str) -> dict[tuple[str, str], list[int]]:
    """The units table of ``text``: (arm, stage) → counts in the order finished, running, dead, queued,
    failed."""
    lines = text.split("units of work:\n")[1].split("\n\n")[0].splitlines()
    assert lines[0].split() == ["finished", "running", "dead", "queued", "failed"]
    out = {}
    for line in lines[2:]:  # after the header's two lines; the labels here have no spaces
        parts = line.split()
        out[(parts[0], " ".join(parts[1:-5]))] = [int(c) for c in parts[-5:]]
    return out


def test_status_counts_units_and_tells_a_live_worker_from_a_dead_one(
    tmp_path: Path, gone_pid: int, live_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_study(
        arms={"loss.mining": ["batch_hard", "all"]},
        tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-2}}},
        final={"seeds": [0, 1]},
    )
    spec = study.parse_study(raw)
    storage = store.open_storage(None, "tiny", tmp_path, create=True)
    prepare(storage, spec)
    queue = WorkQueue(spec, None, tmp_path, invocation="test")
    claimed = {}
    for unit, trial in queue.candidates(queue.snapshot()):  # the four tune units
        trial_id = queue.claim(unit, trial)
        assert trial_id is not None
        claimed[(unit.attrs["arm"], unit.key)] = trial_id
    assert len(claimed) == 4
    hard, every = "mining=batch_hard", "mining=all"
    queue.storage.set_trial_state_values(claimed[(hard, "tune/0")], TrialState.COMPLETE, [0.5])
    for (arm, key), pid in {(hard, "tune/1"): live_pid, (every, "tune/0"): gone_pid}.items():
        queue.storage.set_trial_user_attr(
            claimed[(arm, key)], "worker", {"host": HOST, "pid": pid, "gpus": None}
        )
    queue.storage.set_trial_user_attr(claimed[(every, "tune/1")], "reason", "boom")
    queue.storage.set_trial_state_values(claimed[(every, "tune/1")], TrialState.FAIL)

    text = status("tiny", results=tmp_path)
    assert rows(text) == {
        (hard, "tune"): [1, 1, 0, 0, 0],
        (hard, "final"): [0, 0, 0, 2, 0],
        (every, "tune"): [0, 0, 1, 0, 1],  # before: both RUNNING trials counted as running
        (every, "final"): [0, 0, 0, 2, 0],
        ("total", ""): [1, 1, 1, 4, 1],
    }
    running = text.split("running:\n")[1].split("\n\n")[0]
    assert running.strip().startswith("#1 tune/1 (mining=batch_hard, tune)")
    assert f"worker pid {live_pid} on {HOST}" in running and str(gone_pid) not in running
    dead = text.split("dead (their worker is gone; the next `dmlh study run` re-queues them):\n")[1]
    assert f"#0 tune/0 (mining=all, tune): was worker pid {gone_pid} on {HOST}" in dead
    assert "#1 mining=all (tune): boom" in text  # the failure, with its reason

    # the study's YAML names it as well as its name does
    capsys.readouterr()
    assert main(["--results", str(tmp_path), "study", "status", str(write(tmp_path, raw))]) == 0
    assert rows(capsys.readouterr().out) == rows(text)


def test_a_fresh_study_shows_its_queued_units(tmp_path: Path) -> None:
    spec = study.parse_study(tiny_study(final={"seeds": [0, 1, 2]}))
    prepare(store.open_storage(None, "tiny", tmp_path, create=True), spec)
    text = status("tiny", results=tmp_path)
    assert text.startswith("study tiny: 0 trials (none started yet)")
    assert rows(text) == {("base", "final"): [0, 0, 0, 3, 0], ("total", ""): [0, 0, 0, 3, 0]}


def test_the_report_notes_an_arm_whose_every_final_run_failed(tmp_path: Path) -> None:
    """Before: the arm was left out of the comparison table without a word."""
    raw = tiny_study(
        arms={"optimizer": [{"name": "adam", "lr": 1e-3}, {"name": "sgd", "lr": 1e30}]},
        final={"seeds": [0, 1]},
    )
    raw["base"]["model"]["normalize"] = "none"  # lr 1e30 makes the loss NaN at the first step
    with pytest.raises(study.StudyIncompleteError) as e:
        study.run_study(write(tmp_path, raw), results=tmp_path)
    assert e.value.report is not None
    note = "arm optimizer=sgd: no finished final run (2 failed: NonFiniteLossError"
    comparison = (e.value.report / "report.md").read_text().split("## Comparison")[1].split("\n## ")[0]
    assert note in comparison and "arm optimizer=adam" not in comparison
    assert note in (e.value.report / "tables" / "comparison.md").read_text()
