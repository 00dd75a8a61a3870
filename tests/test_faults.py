"""Faults injected on purpose (``pytest -m faults``): a torn journal line, a disk that fills mid-study,
Ctrl-C. Each time: nothing finished is lost or duplicated, the study resumes, the user reads one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from harness import store
from harness.journal import SafeJournalBackend, repair
from tests.test_study import tiny_study, trials_by_study

pytestmark = pytest.mark.faults

DISK_MIB = 64
RECORD = {"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}


def journal_lines(n: int) -> list[bytes]:
    return [json.dumps({**RECORD, "study_name": f"s{i}"}, separators=(",", ":")).encode() for i in range(n)]


def test_a_torn_last_line_is_set_aside_and_the_whole_records_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    whole = journal_lines(3)
    path.write_bytes(b"\n".join(whole) + b"\n" + whole[0][:20])  # the last write was cut short
    assert repair(path)
    assert path.read_bytes() == b"\n".join(whole) + b"\n"
    (aside,) = tmp_path.glob("journal.log.torn-*")
    assert aside.read_bytes() == whole[0][:20]
    assert not repair(path)  # a whole journal is left alone


def test_a_record_appended_behind_torn_bytes_is_recovered(tmp_path: Path) -> None:
    """What a full disk left before this fix: torn bytes, then the next append glued to them on one line,
    then more records. Optuna refused the whole file (JSONDecodeError); now only the torn bytes go."""
    path = tmp_path / "journal.log"
    a, b, c = journal_lines(3)
    path.write_bytes(a + b"\n" + b[:17] + b + b"\n" + b"garbage\n" + c + b"\n")
    assert repair(path)
    assert path.read_bytes().splitlines() == [a, b, c]
    (aside,) = tmp_path.glob("journal.log.torn-*")
    assert aside.read_bytes() == b[:17] + b"\ngarbage"


def test_an_append_behind_a_torn_tail_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    backend = SafeJournalBackend(path)
    a, b = journal_lines(2)
    backend.append_logs([json.loads(a)])
    with open(path, "ab") as f:
        f.write(b[:10])  # another process's write, cut short
    backend.append_logs([json.loads(b)])
    assert path.read_bytes().splitlines() == [a, b]


def test_a_study_with_a_torn_journal_resumes_with_every_finished_run(tmp_path: Path) -> None:
    spec = tiny_study(final={"seeds": [0, 1]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    from harness import study

    study.run_study(path, results=tmp_path, report=False)
    journal = tmp_path / "tiny" / "journal.log"
    intact = journal.read_bytes()
    last = intact.splitlines()[-1]
    journal.write_bytes(intact + last[: len(last) // 2])  # torn, as a full disk leaves it
    df = store.load("tiny", results=tmp_path)  # before: json.decoder.JSONDecodeError, naming no file
    assert (df["state"] == "COMPLETE").sum() == 2
    assert journal.read_bytes() == intact
    spec["final"]["seeds"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(spec))
    study.run_study(path, results=tmp_path, report=False)
    done = [t for t in trials_by_study("tiny", tmp_path)["tiny"] if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in done) == [0, 1, 2]  # nothing rerun, nothing lost


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs (root only: skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs that can fill up")
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(mount)]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def dmlh(results: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "harness.cli", "--results", str(results), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with a ballast file; returns it."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return ballast


def test_a_disk_that_fills_mid_study_ends_with_one_line_and_the_study_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    spec = tiny_study(final={"seeds": [0, 1]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = dmlh(small_disk, "study", "run", str(path))
    assert first.returncode == 0, first.stderr
    ballast = fill(small_disk)
    spec["final"]["seeds"] = [0, 1, 2, 3]
    path.write_text(yaml.safe_dump(spec))
    full = dmlh(small_disk, "study", "run", str(path))
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("disk full" in last or "No space left" in last), full.stderr
    ballast.unlink()
    for command in (["study", "status", "tiny"], ["study", "run", str(path)]):
        again = dmlh(small_disk, *command)
        assert again.returncode == 0, again.stderr
    storage = optuna.storages.JournalStorage(SafeJournalBackend(small_disk / "tiny" / "journal.log"))
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    done = sorted(t.user_attrs["seed"] for t in trials if t.state == TrialState.COMPLETE)
    assert done == [0, 1, 2, 3]  # the two finished before the full disk kept, none duplicated


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_reruns_the_same_hyperparameters(tmp_path: Path) -> None:
    spec = tiny_study(
        final={"seeds": [0]},
        tune={"n_trials": 1, "params": {"loss.margin": {"low": 0.05, "high": 0.5}}},
    )
    spec["base"]["sampler"]["batches_per_epoch"] = 400  # long enough to be interrupted mid-trial
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "harness.cli", "--results", str(tmp_path), "study", "run", str(path)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, **pipes, start_new_session=True)  # type: ignore[call-overload]
    beats = tmp_path / "tiny" / "heartbeats"
    deadline = time.time() + 600
    while not (beats.is_dir() and any(beats.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the study never started its trial"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "lost its worker" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: "), err
    again = dmlh(tmp_path, "study", "run", str(path))
    assert again.returncode == 0, again.stderr
    (tune,) = [ts for name, ts in trials_by_study("tiny", tmp_path).items() if "/tune/" in name]
    assert [t.state for t in tune] == [TrialState.FAIL, TrialState.COMPLETE]
    assert tune[1].user_attrs["retry_of"] == 0 and "margin" in str(tune[0].params)
    assert tune[1].params == tune[0].params  # the interrupted trial's values, not new ones


def test_a_run_name_is_claimed_before_training_and_a_dead_claim_is_taken_over(tmp_path: Path) -> None:
    from harness.errors import HarnessError
    from harness.rundir import claimed

    out = tmp_path / "runs" / "x"
    with claimed(out):
        with pytest.raises(HarnessError, match="another dmlh run .* is training .*runs/x now"):
            with claimed(out, overwrite=True):
                pass
    pid = "import os; print(os.getpid())"
    gone = subprocess.run([sys.executable, "-c", pid], capture_output=True, text=True, check=True)
    (tmp_path / "runs" / ".x.claim").write_text(f"{socket.gethostname()} {gone.stdout.strip()}")
    with claimed(out):  # its process is gone: the name is free
        out.mkdir()
        (out / "complete").write_text("done\n")
    with pytest.raises(HarnessError, match="already holds a run; pass --overwrite"):
        with claimed(out):
            pass


def test_two_overlapping_runs_of_one_name_never_replace_each_other_silently(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    base = tiny_study()["base"]
    base["sampler"]["batches_per_epoch"] = 60
    config.write_text(yaml.safe_dump(base))
    cmd = [sys.executable, "-m", "harness.cli", "--results", str(tmp_path), "run", str(config), "--name", "x"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [subprocess.Popen(cmd, **pipes) for _ in range(2)]  # type: ignore[call-overload]
    outs = [(p.wait(timeout=1200), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], outs
    refused = next(err for code, _, err in outs if code == 2)
    assert "another dmlh run" in refused or "already holds a run" in refused, refused
    assert sum("run written to" in out for _, out, _ in outs) == 1
