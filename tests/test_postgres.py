"""One study shared by two workers (as on two machines) through a real, throwaway PostgreSQL server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """Start a PostgreSQL server in a temporary folder on a free port; stop and remove it afterwards."""
    bindir = Path(BIN[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="dmlh-pg-"))
    data, port = root / "data", _free_port()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=60)

    pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start")
    try:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dmlh")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/dmlh"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_one_postgresql_storage_run_every_arm_and_seed_once(
    postgres_url: str, tmp_path: Path
) -> None:
    spec = tiny_study(
        "shared",
        arms={"loss.mining": ["batch_hard", "all"]},
        final={"seeds": [0, 1, 2]},
        tune={"n_trials": 2, "params": {"optimizer.lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    )
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(spec))
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "--results",
                str(tmp_path / f"machine{i}"),
                "study",
                "run",
                str(path),
                "--storage",
                postgres_url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs

    storage = store.open_storage(postgres_url, "shared", tmp_path)
    names = store.study_names(storage, "shared")
    assert names == ["shared", "shared/tune/mining=all", "shared/tune/mining=batch_hard"]
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        done = Counter(t.user_attrs["unit"] for t in trials if t.state == TrialState.COMPLETE)
        expected = (
            {"tune/0", "tune/1"}
            if "/tune/" in name
            else {f"mining={m}/seed={s}" for m in ("batch_hard", "all") for s in (0, 1, 2)}
        )
        assert done == Counter(expected), name  # every unit exactly once
        # anything else is a concurrently queued copy that was never run
        assert all(t.user_attrs.get("duplicate") for t in trials if t.state == TrialState.FAIL)
    df = store.load("shared", storage=postgres_url, results=tmp_path)
    assert len(df) == 10 and set(df.state) == {"COMPLETE"}
    assert {p.name for p in tmp_path.glob("machine*/shared/runs/*")} >= set(df.run_key)
