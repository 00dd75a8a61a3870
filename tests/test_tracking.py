"""Experiment trackers (``--track``): a study logs nested runs into MLflow, TensorBoard and W&B (offline),
read back with each tracker's own reader; an unreachable tracker is one warning and the study goes on; a
missing client is an error naming its extra before any training; optuna-dashboard opens a study's journal."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pandas as pd
import pytest
import yaml

from harness import cli, study
from harness.errors import ConfigError
from harness.tracking import Tracking, parse
from tests.test_study import TINY_BASE, tiny_study, trials_by_study, write

TUNE = {"n_trials": 2, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-2, "log": True}}}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny study (1 arm: tune 2 + final 1, 1 epoch) logged to all three trackers, from its own
    folder (MLflow's SQLite store keeps artifacts under the working directory)."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        path = write(root, tiny_study(tune=TUNE, final={"seeds": [0]}))
        track = [f"mlflow:sqlite:///{root}/mlflow.db", f"tensorboard:{root}/tb", "wandb"]
        study.run_study(path, results=root / "results", track=track)
        yield root
    import wandb

    wandb.teardown()  # its service process


def _trials(root: Path) -> list[Any]:
    return [t for ts in trials_by_study("tiny", root / "results").values() for t in ts]


def test_mlflow_holds_a_parent_run_per_study_with_a_child_run_per_run(tracked: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dml-harness").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tiny"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["base seed 0", "base tune 0", "base tune 1"]
    by_slot = {t.user_attrs["slot"]: t for t in _trials(tracked) if t.user_attrs.get("stage") == "tune"}
    for child in children:
        tags = child.data.tags
        assert (tags["study"], tags["arm"], tags["seed"]) == ("tiny", "base", "0")
        assert tags["stage"] == ("tune" if "tune" in child.info.run_name else "final")
        assert child.data.params["loss.mining"] == "batch_hard" and child.data.params["train.epochs"] == "1"
        history = client.get_metric_history(child.info.run_id, "val/recall_at_1")
        assert [m.step for m in history] == [1]
        if tags["stage"] == "tune":
            trial = by_slot[int(tags["slot"])]
            assert float(child.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
            assert child.data.metrics["final/val/recall_at_1"] == trial.user_attrs["metrics"]["val/recall@1"]
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert "plots/learning_curves.png" in plots


def test_tensorboard_holds_a_log_dir_per_study_with_a_subdir_per_run(tracked: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = tracked / "tb" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["base_seed_0", "base_tune_0", "base_tune_1", "report"]
    run_key = {
        t.user_attrs["slot"]: t.user_attrs["run_key"] for t in _trials(tracked) if "slot" in t.user_attrs
    }
    history = pd.read_csv(tracked / "results" / "tiny" / "runs" / run_key[1] / "history.csv")
    events = EventAccumulator(str(folder / "base_tune_1"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("val/recall@1")]
    assert logged == [(1, pytest.approx(history["val/recall@1"].iloc[0]))]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["tag.stage"].string_value == "tune" and hparams["loss.mining"].string_value == "batch_hard"
    assert "final/val/recall@1" in events.Tags()["scalars"]
    report = EventAccumulator(str(folder / "report"), size_guidance={"images": 0})
    report.Reload()
    assert "learning_curves" in report.Tags()["images"]


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (``run-<id>.wandb``): protobuf ``Record``s of wandb's own schema, in
    LevelDB's log framing (32 KiB blocks; a 7-byte header per chunk: CRC, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield Record.FromString(chunks)
            chunks = b""


def test_wandb_offline_runs_are_grouped_by_study_with_the_stage_as_job_type(tracked: Path) -> None:
    runs = {}
    for path in (tracked / "wandb").glob("offline-run-*/run-*.wandb"):
        records = list(_wandb_records(path))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        summary = {
            i.key or "/".join(i.nested_key): json.loads(i.value_json)
            for r in records
            if r.WhichOneof("record_type") == "summary"
            for i in r.summary.update
        }
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        runs[run.display_name] = (run, history, summary, config)
    assert sorted(runs) == ["base seed 0", "base tune 0", "base tune 1", "tiny report"]
    assert {r.run_group for r, *_ in runs.values()} == {"tiny"}
    assert sorted(r.job_type for r, *_ in runs.values()) == ["final", "report", "tune", "tune"]
    run, history, summary, config = runs["base seed 0"]
    final = next(t for t in _trials(tracked) if t.user_attrs.get("stage") == "final")
    assert [h["_step"] for h in history] == [1] and "val/recall@1" in history[0]
    assert summary["final/test/recall@1"] == final.user_attrs["metrics"]["test/recall@1"]
    assert config["loss"]["mining"] == "batch_hard" and config["dmlh"]["stage"] == "final"
    assert "stage=final" in run.tags
    assert any("plots/learning_curves" in key for h in runs["tiny report"][1] for key in h)


def test_optuna_dashboard_opens_the_study_journal(tracked: Path) -> None:
    """README: ``optuna-dashboard results/<study>/journal.log`` shows the study and its tune studies."""
    import optuna_dashboard

    app = optuna_dashboard.wsgi(str(tracked / "results" / "tiny" / "journal.log"))
    environ: dict[str, Any] = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"]
    names = {s["study_name"] for s in json.loads(body)["study_summaries"]}
    assert names == {"tiny", "tiny/tune/base"}


def test_an_unreachable_tracker_is_one_warning_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    spec = tiny_study(arms={"loss.mining": ["batch_hard", "all"]}, final={"seeds": [0]})
    spec["track"] = [f"mlflow:http://127.0.0.1:{port}", f"tensorboard:{tmp_path}/tb"]
    with caplog.at_level(logging.WARNING):
        study.run_study(write(tmp_path, spec), results=tmp_path, report=False)
    trials = trials_by_study("tiny", tmp_path)["tiny"]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    warned = [r for r in caplog.records if r.name == "harness.tracking"]
    assert len(warned) == 1 and f"127.0.0.1:{port}" in warned[0].getMessage()
    assert not [r for r in caplog.records if r.name.split(".")[0] in ("mlflow", "urllib3")]
    assert sorted(p.name for p in (tmp_path / "tb" / "tiny").iterdir()) == [
        "mining=all_seed_0",
        "mining=batch_hard_seed_0",
    ]


def test_a_missing_client_names_its_extra_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "tinyrun", **TINY_BASE}))
    assert cli.main(["--results", str(tmp_path), "run", str(config), "--track", "wandb"]) == 2
    assert (
        "--track: wandb needs its client 'wandb': pip install 'dml-harness[wandb]'" in capsys.readouterr().err
    )
    assert not (tmp_path / "runs").exists()
    spec = tiny_study(track="wandb")
    with pytest.raises(ConfigError, match=r"track: wandb needs .*dml-harness\[wandb\]"):
        study.run_study(write(tmp_path, spec), results=tmp_path)
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        parse(["tensorbord"], tmp_path)


def test_dmlh_run_logs_its_run_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "tinyrun", **TINY_BASE}))
    assert cli.main(["--results", str(tmp_path), "run", str(config), "--track", "tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard" / "runs" / "tinyrun"))
    events.Reload()
    assert {"val/recall@1", "final/test/recall@1", "train/loss"} <= set(events.Tags()["scalars"])


def test_a_worker_process_gets_the_specs_of_the_live_trackers() -> None:
    import pickle

    tracking = Tracking(parse(["tensorboard:tb", "wandb:p"], "results"))
    tracking.trackers[1].failed = True  # told once in this process; a worker does not try it again
    copy = pickle.loads(pickle.dumps(tracking))
    assert [(s.kind, s.target) for s in copy.specs] == [("tensorboard", "tb")]
    assert not copy.trackers[0].failed
