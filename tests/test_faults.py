"""Faults injected on purpose (``pytest -m faults``): a torn journal line, a disk that fills mid-study,
Ctrl-C, kill -9 of a study and of one of its worker processes, two overlapping runs of one name, odd image
files. Each time: nothing finished is lost or duplicated, the numbers are those of an uninterrupted run, the
user reads one line. (The PostgreSQL outage is in tests/test_postgres.py, marked ``faults`` too.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image

from harness import store, study
from harness.cli import main
from harness.config import validate
from harness.journal import SafeJournalBackend, repair
from harness.reporting.status import status
from harness.train import run
from tests.fixtures import make_cub200
from tests.test_data_verify import _odd_cub
from tests.test_study import complete_units, tiny_study, trials_by_study, write
from tests.test_study_status import rows

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
    for written in ("tables", "plots"):  # a report needs new space (rewriting the old one's files fits)
        shutil.rmtree(small_disk / "tiny" / written)
    fill(small_disk)  # again: the failed run gave back what it had half written, and so did the rmtree
    report = dmlh(small_disk, "report", "tiny")  # before: a raw traceback
    assert report.returncode == 2 and "Traceback" not in report.stderr, report.stderr
    assert report.stderr.strip().splitlines()[-1].startswith("error: disk full writing "), report.stderr
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
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"interrupted: 0 of \d+ runs are finished and stored; rerun the same command to resume", last
    ), err
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


#: How long a test waits for a study to reach the moment its fault is injected: a hang guard only, far above
#: a run on a loaded 2-core machine; the wait itself ends as soon as the condition holds.
HANG_GUARD_S = 900


def test_kill_9_of_a_study_leaves_a_dead_trial_that_status_shows_and_the_rerun_finishes(
    tmp_path: Path,
) -> None:
    spec = tiny_study(final={"seeds": [0]})
    spec["base"]["sampler"]["batches_per_epoch"] = 400  # long enough to be killed mid-trial
    path = write(tmp_path, spec)
    cmd = [sys.executable, "-m", "harness.cli", "--results", str(tmp_path), "study", "run", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    beats = tmp_path / "tiny" / "heartbeats"
    deadline = time.monotonic() + HANG_GUARD_S  # was 60 s: too short for a start under heavy load
    while not (beats.is_dir() and any(beats.iterdir())):
        assert proc.poll() is None, "the study ended before its trial could be killed"
        assert time.monotonic() < deadline, "the study never started its trial"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (lost,) = trials_by_study("tiny", tmp_path)["tiny"]
    assert lost.state == TrialState.RUNNING  # what a dead worker leaves behind
    # status tells it from a running trial (before: listed as RUNNING, nothing queued)
    text = status("tiny", results=tmp_path)
    assert rows(text)[("base", "final")] == [0, 0, 1, 0, 0] and "\nrunning:" not in text
    assert f"#0 base/seed=0 (base, final): was worker pid {proc.pid} on {socket.gethostname()}" in text

    study.run_study(path, results=tmp_path, report=False)
    trials = trials_by_study("tiny", tmp_path)["tiny"]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"].startswith("lost")
    assert trials[1].user_attrs["retry_of"] == trials[0].number
    assert trials[1].user_attrs["run_key"] == trials[0].user_attrs["run_key"]
    assert store.load("tiny", results=tmp_path).lost.tolist() == [True, False]
    assert rows(status("tiny", results=tmp_path))[("base", "final")] == [1, 0, 0, 0, 0]


def test_kill_9_of_a_worker_process_costs_only_its_trial(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """`--workers 2`: kill -9 the loky worker process (not the main one) as soon as it claims a trial. The
    main process re-queues that trial with its parameters and finishes it, every unit is stored once, the
    rerun's numbers are those of an uninterrupted run of its config, and the user reads one line."""
    seeds = list(range(6))  # work enough to keep the main process busy while the worker process starts
    spec = tiny_study(final={"seeds": seeds})
    spec["base"]["sampler"]["batches_per_epoch"] = 300  # long enough to be killed mid-trial
    killed: list[optuna.trial.FrozenTrial] = []
    done = threading.Event()

    def kill_the_first_trial_of_another_process() -> None:
        while not done.wait(0.1):
            if not (tmp_path / "run" / "tiny" / "journal.log").is_file():
                continue
            for t in trials_by_study("tiny", tmp_path / "run").get("tiny", []):
                pid = t.user_attrs.get("worker", {}).get("pid")  # recorded a moment after the claim
                if t.state == TrialState.RUNNING and pid not in (None, os.getpid()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(t)
                    return

    killer = threading.Thread(target=kill_the_first_trial_of_another_process, daemon=True)
    killer.start()
    try:
        with caplog.at_level("INFO"):
            study.run_study(write(tmp_path, spec), workers=2, results=tmp_path / "run", report=False)
    finally:
        done.set()
        killer.join()
    assert killed, "the worker process claimed no trial before the main process had run them all"
    trials = trials_by_study("tiny", tmp_path / "run")["tiny"]
    assert complete_units(trials) == Counter(f"base/seed={s}" for s in seeds)  # each once, none lost
    dead = next(t for t in trials if t.number == killed[0].number)
    (rerun,) = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["reason"].startswith("lost")
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["seed"] == dead.user_attrs["seed"]
    assert not any(r.levelname == "ERROR" for r in caplog.records)
    (line,) = [r.getMessage() for r in caplog.records if "a worker process died" in r.getMessage()]
    assert "its trial was re-queued and finished" in line  # and when it happened, one line said so:
    assert sum("lost its worker; re-queued" in r.getMessage() for r in caplog.records) == 1
    assert "Traceback" not in capfd.readouterr().err
    # the same numbers as a study that was never interrupted, on the killed trial's seed
    spec["final"]["seeds"] = [dead.user_attrs["seed"]]
    study.run_study(write(tmp_path, spec), results=tmp_path / "ref", report=False)
    (ref,) = trials_by_study("tiny", tmp_path / "ref")["tiny"]
    assert ref.user_attrs["run_key"] == rerun.user_attrs["run_key"]
    assert ref.user_attrs["metrics"] == rerun.user_attrs["metrics"]


# -- odd image files: each kind trains as what it shows, or is refused (or dropped) by name ----------------


def cub_run(root: Path, **data: object) -> dict[str, object]:
    """A one-epoch run on the CUB-layout fixture at ``root`` (its two train and two test classes)."""
    return {
        "data": {
            "dataset": {"name": "cub200", "root": str(root)},
            "val_fraction": 0,
            "input_size": 16,
            **data,
        },
        "sampler": {"p": 2, "k": 2, "batches_per_epoch": 3},
        "backbone": {"name": "small_convnet", "width": 4},
        "train": {"epochs": 1, "device": "cpu", "threads": 1},
        "eval": {"nmi": False},
    }


def test_odd_images_that_convert_train_as_the_plain_rgb_images_they_show(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CMYK JPEG, a 16-bit PNG named .jpg, an RGBA PNG and a palette GIF among the JPEGs: the run gives
    the same numbers as the same dataset holding each as the plain RGB image it shows, and says in one line
    how many files it converts (before: the 16-bit PNG trained as an all-white image)."""
    odd = _odd_cub(tmp_path / "odd", tiny=False)
    plain = make_cub200(tmp_path / "plain")  # the same images, byte for byte, but for the odd ones
    rgba = np.full((40, 40, 3), 255, dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0)  # the opaque half; the transparent half composited on white
    shows = {
        "cmyk": np.asarray(Image.open(odd["cmyk"]).convert("RGB")),  # Pillow's CMYK conversion
        "png16": np.full((40, 40, 3), 128, dtype=np.uint8),  # mid-grey 0x8080, scaled, not clipped
        "rgba": rgba,
        "palette": np.full((40, 40, 3), (0, 0, 255), dtype=np.uint8),
    }
    for kind, pixels in shows.items():  # lossless, so that the pixels are exactly these
        Image.fromarray(pixels).save(plain / odd[kind].relative_to(tmp_path / "odd"), format="PNG")
    with caplog.at_level("INFO", logger="harness.data"):
        converted = run(validate(cub_run(tmp_path / "odd")))
    (line,) = [r.getMessage() for r in caplog.records if "converted to RGB when loaded" in r.getMessage()]
    assert line.startswith("cub200: 4 image files are converted to RGB when loaded (")
    assert all(f"1 {kind}" in line for kind in ("16-bit grey", "CMYK", "alpha (RGBA)", "palette (P)"))
    assert run(validate(cub_run(plain))).metrics == converted.metrics


def test_a_1x1_image_is_refused_by_name_or_dropped_by_name_with_skip_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_cub200(tmp_path / "cub")
    tiny = root / "images/001.Class_1/Class_1_0000_1.jpg"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tiny, format="JPEG")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cub_run(root)))
    assert main(["--results", str(tmp_path / "results"), "run", str(config)]) == 2  # before training
    err = capsys.readouterr().err
    assert err.startswith("error: cub200: 1 of 12 image files cannot be used:") and "Traceback" not in err
    assert f"{tiny}: 1x1 px: a side is shorter than data.min_side=8 px" in err
    assert "set data.skip_bad=true to train without them" in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("metrics.json"))
    with caplog.at_level("WARNING", logger="harness.data"):
        skipped = run(validate(cub_run(root, skip_bad=True)))
    assert (
        f"  - {tiny}: 1x1 px" in caplog.text and "drops 1 bad image files (1 of 6 from train)" in caplog.text
    )
    tiny.unlink()  # the same dataset without that file: the same numbers
    assert run(validate(cub_run(root, skip_bad=True))).metrics == skipped.metrics
