"""A quiet, useful log (issue #27): a study's redirected log has no third-party INFO line, no repeated
warning and no carriage return; it ends saying where the report is; studies are named by name or YAML."""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness import logs
from harness.cli import main
from tests.fixtures import make_cub200

ROOT = Path(__file__).resolve().parents[1]
#: A line of the harness's log format: time, level, logger, message.
LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


def test_a_repeated_warning_is_shown_once_and_counted_at_the_end() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    repeats = logs.RepeatedWarnings()
    handler.addFilter(repeats)
    logger = logging.getLogger("harness.test_quiet_log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for _ in range(3):
            logger.warning("rounds to %d validation classes", 1)
            logger.info("epoch line")
        logger.warning("another warning")
        repeats.summary()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert out.getvalue().splitlines() == [
        "rounds to 1 validation classes",
        "epoch line",
        "epoch line",
        "epoch line",
        "another warning",
        "rounds to 1 validation classes [this warning came 3 times; shown once]",
    ]


def _bars_shown_without_a_terminal(path: Path) -> list[int]:
    """Lines of ``path`` that call tqdm without ``disable=None`` (tqdm's "only on a terminal")."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "tqdm":
            disable = [k.value for k in node.keywords if k.arg == "disable"]
            if not any(isinstance(v, ast.Constant) and v.value is None for v in disable):
                lines.append(node.lineno)
    return lines


def test_every_progress_bar_shows_only_on_a_terminal() -> None:
    """tqdm draws with carriage returns: the harness makes its bars with ``logs.progress_bar`` (or passes
    ``disable=None``), so none is drawn into a redirected log."""
    offending = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / "harness").rglob("*.py")
        if path.name != "logs.py" and (lines := _bars_shown_without_a_terminal(path))
    }
    assert not offending


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with studies/tiny.yaml: two arms, one seed, one epoch on a folder of JPEGs."""
    folder = tmp_path_factory.mktemp("project")
    root = make_cub200(folder / "cub", classes=(1, 2, 3, 4, 5, 101, 102, 103), per_class=4, size=24)
    study = {
        "name": "tiny",
        "base": {
            "data": {"dataset": {"name": "cub200", "root": str(root)}, "val_fraction": 0.4},
            "sampler": {"p": 2, "k": 2, "batches_per_epoch": 2},
            "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
            "model": {"name": "embedder", "embedding_dim": 8},
            "train": {"epochs": 1},
            "eval": {"nmi": False, "ks": [1, 2]},
        },
        "arms": {"loss": ["triplet", "multi_similarity"]},
        "final": {"seeds": [0]},
    }
    (folder / "studies").mkdir()
    (folder / "studies" / "tiny.yaml").write_text(yaml.safe_dump(study))
    return folder


def test_a_study_run_by_name_logs_quietly_into_a_file(tiny_study: Path) -> None:
    env = {**os.environ, "DMLH_CACHE": str(tiny_study / "cache")}  # the images are decoded (a progress bar)
    env.pop("TQDM_DISABLE", None)
    with open(tiny_study / "out.txt", "w") as out, open(tiny_study / "err.txt", "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "harness.cli", "study", "run", "tiny"],
            cwd=tiny_study,
            env=env,
            stdout=out,
            stderr=err,
            timeout=3600,
        )
    stdout, stderr = (tiny_study / "out.txt").read_text(), (tiny_study / "err.txt").read_text()
    assert done.returncode == 0, stderr[-3000:]
    assert "\r" not in stdout + stderr
    assert "verifying images" not in stderr
    lines = [m for m in map(LINE.match, stderr.splitlines()) if m]
    third_party = [
        m.group(0) for m in lines if not m["logger"].startswith("harness") and m["level"] == "INFO"
    ]
    third_party += re.findall(r"^\[I \d{4}.*$", stderr, flags=re.M)  # Optuna's own handler, its own format
    assert not third_party
    warnings = Counter((m["logger"], m["message"]) for m in lines if m["level"] == "WARNING")
    assert not [w for w, n in warnings.items() if n > 1]
    assert "report (tables and figures on one page): results/tiny/report.html" in stdout


def test_study_commands_take_the_name_or_the_yaml(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_study)
    assert main(["study", "check", "tiny"]) == 0
    assert main(["study", "check", "studies/tiny.yaml"]) == 0
    assert capsys.readouterr().out.count("tiny") >= 2
    assert main(["study", "run", "no_such_study"]) == 2
    assert "no_such_study: no such study file (nor studies/no_such_study.yaml)" in capsys.readouterr().err
