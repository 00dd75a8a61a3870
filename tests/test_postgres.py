"""One study shared by two workers (as on two machines) through a real, throwaway PostgreSQL server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_study import tiny_study

from harness import store

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = pytest.mark.skipif(
    not BIN, reason="PostgreSQL server binaries (Debian package postgresql) are not installed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A throwaway PostgreSQL server in a temporary folder on a free port, which a test may stop and start."""

    def __init__(self) -> None:
        self.bindir = Path(BIN[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="dmlh-pg-"))
        self.data, self.port = self.root / "data", _free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/dmlh"

    def pg(self, tool: str, *args: str) -> None:
        cmd = [*self.as_postgres, str(self.bindir / tool), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        opts += " -c max_connections=50"
        self.pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Start the server and create database ``dmlh``; stop and remove it afterwards."""
    srv = Server()
    srv.pg("initdb", "-D", str(srv.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    srv.start()
    try:
        srv.pg("createdb", "-h", "127.0.0.1", "-p", str(srv.port), "-U", "postgres", "dmlh")
        yield srv
    finally:
        srv.stop("immediate")
        shutil.rmtree(srv.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(server: Server) -> str:
    return server.url


def _machines(path: Path, url: str, tmp_path: Path) -> list[subprocess.Popen[str]]:
    """Two `dmlh study run` processes on one storage, each with its own results folder (two machines)."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "--results", str(tmp_path / f"machine{i}")]
            + ["study", "run", str(path), "--storage", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _assert_every_unit_once(url: str, tmp_path: Path, seeds: tuple[int, ...]) -> None:
    storage = store.open_storage(url, "shared", tmp_path)
    names = store.study_names(storage, "shared")
    assert names == ["shared", "shared/tune/mining=all", "shared/tune/mining=batch_hard"]
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        done = Counter(t.user_attrs["unit"] for t in trials if t.state == TrialState.COMPLETE)
        expected = (
            {"tune/0", "tune/1"}
            if "/tune/" in name
            else {f"mining={m}/seed={s}" for m in ("batch_hard", "all") for s in seeds}
        )
        assert done == Counter(expected), name  # every unit exactly once
        # anything else is a concurrently queued copy that was never run
        assert all(t.user_attrs.get("duplicate") for t in trials if t.state == TrialState.FAIL)
    df = store.load("shared", storage=url, results=tmp_path)
    assert len(df) == 4 + 2 * len(seeds) and set(df.state) == {"COMPLETE"}
    assert {p.name for p in tmp_path.glob("machine*/shared/runs/*")} >= set(df.run_key)


def _spec(tmp_path: Path, seeds: tuple[int, ...], batches_per_epoch: int | None = None) -> Path:
    """The shared two-arm study; ``batches_per_epoch`` lengthens each trial (default: the tiny study's)."""
    spec = tiny_study(
        "shared",
        arms={"loss.mining": ["batch_hard", "all"]},
        final={"seeds": list(seeds)},
        tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    )
    if batches_per_epoch is not None:
        spec["base"]["sampler"]["batches_per_epoch"] = batches_per_epoch
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_two_workers_on_one_postgresql_storage_run_every_arm_and_seed_once(
    postgres_url: str, tmp_path: Path
) -> None:
    machines = _machines(_spec(tmp_path, (0, 1, 2)), postgres_url, tmp_path)
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    _assert_every_unit_once(postgres_url, tmp_path, (0, 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "outage_s",
    [5, pytest.param(75, marks=pytest.mark.faults, id="outage-75s")],  # 75 s: past the old 60 s window
)
def test_a_postgresql_restart_mid_study_is_waited_out_and_loses_or_duplicates_nothing(
    server: Server, tmp_path: Path, outage_s: int
) -> None:
    db = f"restart{outage_s}"
    url = server.url.replace("/dmlh", f"/{db}")
    server.pg("createdb", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", db)
    seeds = (0, 1, 2)
    # trials long enough that the study cannot finish between the poll below and the server stop (on an
    # idle machine the tiny study's 10 units took a few seconds and sometimes ended first)
    machines = _machines(_spec(tmp_path, seeds, batches_per_epoch=30), url, tmp_path)
    storage = store.open_storage(url, "shared", tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(m.poll() is None for m in machines):
        names = [s.study_name for s in storage.get_all_studies()]
        done = sum(
            t.state == TrialState.COMPLETE
            for n in names
            for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)
        )
        if done >= 2:
            break
        time.sleep(0.5)
    assert all(m.poll() is None for m in machines), "the study ended before the restart"
    server.stop("fast")  # drops every connection, as a restart does
    time.sleep(outage_s)
    server.start()
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    print("\n".join(outputs))  # the workers' whole logs, shown by pytest when an assertion fails
    assert [m.returncode for m in machines] == [0, 0]
    log = "".join(outputs)
    assert "lost the database connection" in log and "Traceback" not in log
    assert log.count("lost the database connection") <= 2 * 3  # a line per outage and process, not per retry
    _assert_every_unit_once(url, tmp_path, seeds)
