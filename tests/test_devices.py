"""Worker placement on GPUs (``harness.study.devices``), proven on the CPU: GPUs are simulated by the
``CUDA_VISIBLE_DEVICES`` a study starts with, and each worker process reports the one it really saw."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness import store
from harness.errors import ConfigError
from harness.study.devices import Slot, parse_gpus, plan_workers, visible_gpus
from tests.test_study import tiny_study


def gpus_of(slots: list[Slot]) -> Counter[str]:
    return Counter(",".join(s.gpus) for s in slots)


def test_without_a_gpu_auto_is_one_cpu_worker_and_a_number_is_kept() -> None:
    assert plan_workers("auto", visible=[]) == [Slot(0)]
    assert plan_workers(3, visible=[]) == [Slot(0), Slot(1), Slot(2)]
    assert all(not s.env for s in plan_workers(3, visible=[]))


def test_auto_is_one_worker_per_gpu_times_trials_per_gpu() -> None:
    four = ["0", "1", "2", "3"]
    assert gpus_of(plan_workers("auto", visible=four)) == Counter(four)
    slots = plan_workers("auto", trials_per_gpu=2, visible=four)
    assert len(slots) == 8 and gpus_of(slots) == Counter({g: 2 for g in four})
    assert [s.index for s in slots] == list(range(8))
    assert slots[0].env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_gpus_picks_devices_by_index_among_the_visible_ones() -> None:
    four = ["0", "1", "2", "3"]
    assert gpus_of(plan_workers("auto", parse_gpus("1,3"), visible=four)) == Counter(["1", "3"])
    # under Slurm CUDA_VISIBLE_DEVICES names the machine's devices: index 1 and 3 of "4,5,6,7" are 5 and 7
    assert gpus_of(plan_workers("auto", [1, 3], visible=["4", "5", "6", "7"])) == Counter(["5", "7"])


def test_gpus_per_trial_gives_each_worker_a_group_and_a_number_of_workers_is_dealt_in_turn() -> None:
    slots = plan_workers("auto", gpus_per_trial=2, visible=[str(i) for i in range(8)])
    assert [s.gpus for s in slots] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert slots[1].env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert gpus_of(plan_workers(5, visible=["0", "1"])) == Counter({"0": 3, "1": 2})
    assert [s.gpus for s in plan_workers("auto", gpus_per_trial=2, visible=["0", "1", "2"])] == [("0", "1")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": [0]}, "no device 0; this machine shows 0 GPU"),
        ({"trials_per_gpu": 2}, "no GPU is visible"),
        ({"gpus": [2], "visible": ["0", "1"]}, "no device 2"),
        ({"gpus_per_trial": 3, "visible": ["0", "1"]}, "only 2 GPU"),
        ({"workers": 0}, "--workers must be"),
        ({"trials_per_gpu": 0, "visible": ["0"]}, ">= 1"),
    ],
)
def test_impossible_placements_are_config_errors(kwargs: dict, message: str) -> None:
    kwargs = {"visible": [], **kwargs}
    with pytest.raises(ConfigError, match=message):
        plan_workers(**kwargs)


@pytest.mark.parametrize("text", ["a,b", "", "1,1", "-1"])
def test_bad_gpu_lists_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpus(text)


@pytest.mark.parametrize(
    ("value", "ids"),
    [
        ("0,1,2,3", ["0", "1", "2", "3"]),
        ("", []),
        ("-1", []),
        ("2, 5,-1,7", ["2", "5"]),
        ("GPU-a1,GPU-b2", ["GPU-a1", "GPU-b2"]),
    ],
)
def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does(
    monkeypatch: pytest.MonkeyPatch, value: str, ids: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == ids


@pytest.mark.slow
def test_a_study_on_four_simulated_gpus_runs_two_pinned_workers_per_gpu(tmp_path: Path) -> None:
    """``dmlh study run --workers auto --trials-per-gpu 2`` with 4 GPUs visible: 8 worker processes, each
    started with one device of its own (2 per device), and every trial stored with the device its worker saw;
    ``--gpus 1,3`` then uses only those two."""
    spec = tiny_study(final={"seeds": list(range(8))})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "PYTHONUNBUFFERED": "1"}

    def study_run(*options: str) -> str:
        cmd = [sys.executable, "-m", "harness.cli", "--results", str(tmp_path), "study", "run", str(path)]
        done = subprocess.run(
            [*cmd, *options], env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stderr

    log = study_run("--trials-per-gpu", "2", "--workers", "auto")
    held = re.findall(r"worker (\d+) \(pid (\d+)\) holds GPU (\S+) \(CUDA_VISIBLE_DEVICES=(\S+)\)", log)
    assert sorted(int(w) for w, *_ in held) == list(range(8)), log
    assert len({pid for _, pid, _, _ in held}) == 8  # eight processes
    assert all(gpu == env_seen for _, _, gpu, env_seen in held)  # each saw exactly its own device
    assert Counter(gpu for *_, gpu, _ in held) == Counter({g: 2 for g in "0123"})
    df = store.load("tiny", results=tmp_path)
    assert len(df) == 8 and (df["state"] == "COMPLETE").all()
    assert set(df["gpus"]) <= set("0123")  # one device per trial, never the main process's four
    assert set(df["device"]) == {"cpu"}  # no CUDA here: the pinned workers trained on the CPU

    spec["name"] = "tiny2"
    path.write_text(yaml.safe_dump(spec))
    log = study_run("--gpus", "1,3")
    assert Counter(re.findall(r"holds GPU (\S+) ", log)) == Counter({"1": 1, "3": 1}), log
    assert set(store.load("tiny2", results=tmp_path)["gpus"]) <= {"1", "3"}


@pytest.mark.slow
def test_gpus_per_trial_trains_each_trial_with_ddp_on_its_group(tmp_path: Path) -> None:
    """4 simulated GPUs, ``--gpus-per-trial 2``: two workers holding 0,1 and 2,3, each trial a 2-rank DDP
    run (gloo here, as there is no CUDA), recorded with its group; a batch that does not split is refused
    before any trial."""
    spec = tiny_study(final={"seeds": [0, 1]})
    spec["base"]["backbone"]["frozen_bn"] = True  # BatchNorm statistics stay per rank on the CPU
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "harness.cli", "--results", str(tmp_path), "study", "run", str(path)]
    options = {"env": env, "capture_output": True, "text": True, "timeout": 1800}
    done = subprocess.run([*cmd, "--gpus-per-trial", "2"], **options)  # type: ignore[call-overload]
    assert done.returncode == 0, done.stderr
    assert sorted(re.findall(r"holds GPU (\S+) ", done.stderr)) == ["0,1", "2,3"], done.stderr
    df = store.load("tiny", results=tmp_path)
    assert len(df) == 2 and (df["state"] == "COMPLETE").all()
    assert set(df["gpus"]) <= {"0,1", "2,3"}
    for run_dir in df["run_dir"]:
        resolved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        assert resolved["train"]["distributed"]["world_size"] == 2

    spec["name"], spec["base"]["sampler"]["k"] = "odd", 3  # 3 × 3 = 9 images: not 2 equal shards
    path.write_text(yaml.safe_dump(spec))
    odd = subprocess.run([*cmd, "--gpus-per-trial", "2"], **options)  # type: ignore[call-overload]
    assert odd.returncode == 2 and "--gpus-per-trial: 2 ranks cannot share the global batch" in odd.stderr
    assert not (tmp_path / "odd" / "runs").exists()
