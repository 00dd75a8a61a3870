"""Per-run files: the record of a run, written atomically (a reader never sees half a run)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from harness.errors import HarnessError
from harness.files import as_umask_allows
from harness.reporting import embeddings
from harness.reporting.learners import LEARNER_COLUMN

if TYPE_CHECKING:
    from harness.train import RunResult


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


#: Written last into a run folder: a folder without it is not a complete run (a crash or a full disk
#: while writing). Readers that need a complete record check ``is_complete``.
COMPLETE = "complete"


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a completely written run record."""
    return (Path(directory) / COMPLETE).is_file()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_run(result: RunResult, directory: str | Path, *, save_checkpoint: bool = False) -> Path:
    """Write config.yaml, metrics.json, history.csv, diagnostics.json, test_embeddings.npz (and
    checkpoint.pt) to ``directory``, atomically: everything goes to a hidden temporary folder next to it,
    flushed to disk, the ``complete`` marker last, then one rename. A failure (e.g. a full disk) removes the
    temporary folder and raises HarnessError; an earlier run in ``directory`` is kept untouched."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        as_umask_allows(tmp)  # mkdtemp's 0700 would hide the run from colleagues on a server
        _write_files(result, tmp, save_checkpoint)
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / COMPLETE).write_text(f"{result.run_key}\n")
        _fsync(tmp / COMPLETE)
        _replace(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"cannot write the run record {directory}: {e} (nothing was written)") from e
    return directory


def _write_files(result: RunResult, tmp: Path, save_checkpoint: bool) -> None:
    (tmp / "config.yaml").write_text(yaml.safe_dump(result.config, sort_keys=False))
    summary = {
        "run_key": result.run_key,
        "best_epoch": result.best_epoch,
        "selection": result.selection,
        "collapsed": bool(result.metrics.get("train/collapsed", 0.0)),
        "warnings": result.warnings,
        "metrics": result.metrics,
        "timings": result.timings,
    }
    (tmp / "metrics.json").write_text(json.dumps(_json_safe(summary), indent=2))
    pd.DataFrame(result.history).to_csv(tmp / "history.csv", index=False)
    (tmp / "diagnostics.json").write_text(json.dumps(_json_safe(result.diagnostics)))
    embeddings.write(tmp, result.embeddings)
    if save_checkpoint and result.checkpoint is not None:
        import torch

        torch.save(result.checkpoint, tmp / "checkpoint.pt")


@contextmanager
def claimed(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Hold the run name ``directory`` while a run trains and writes it: a claim file beside it, created
    atomically, so that a second ``dmlh run`` of the same name is refused before it trains (never a silent
    replace). Refused too: a name that holds a finished run, unless ``overwrite``. A claim left by a dead
    process on this host is taken over."""
    directory = Path(directory)
    if not overwrite and directory.exists() and any(directory.iterdir()):
        raise HarnessError(
            f"{directory} already holds a run; pass --overwrite to replace it, or --name NEW to keep both"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    claim = directory.with_name(f".{directory.name}.claim")
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = claim.read_text().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                claim.unlink(missing_ok=True)  # its run died: the name is free
                continue
            raise HarnessError(
                f"another dmlh run ({claim.read_text().strip() or 'starting'}: host pid) is training "
                f"{directory} now; wait for it, or pass --name NEW"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield directory
    finally:
        claim.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a claim's or a worker's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(tmp: Path, directory: Path) -> None:
    """Move the finished folder ``tmp`` to ``directory`` (an existing one is replaced, never half)."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def write_failure(
    directory: str | Path, record: dict[str, Any], config: dict[str, Any] | None = None
) -> Path:
    """Record a failed run: ``failed.json`` (reason, traceback, trial) written atomically, and the run's
    ``config.yaml`` unless the folder already holds one (from an earlier, complete run)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".failed.json.tmp"
    tmp.write_text(json.dumps(_json_safe(record), indent=2))
    os.replace(tmp, directory / "failed.json")
    if config is not None and not (directory / "config.yaml").exists():
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def format_metrics(result: RunResult) -> str:
    """The metrics as a small table: rows = metric, columns = val / test / test_last (and an ensemble's
    test_learner1, 2, …); without a validation split one ``test`` column of the last epoch, said plainly;
    then the run's warnings."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in result.metrics.items():
        split, _, metric = key.partition("/")
        rows.setdefault(metric, {})[split] = value
    last = result.selection == "last"
    learners = sorted({m[1] for key in result.metrics if (m := LEARNER_COLUMN.match(key))}, key=int)
    columns: tuple[str, ...] = ("test",) if last else ("val", "test", "test_last")
    columns += tuple(f"test_learner{m}" for m in learners)
    df = pd.DataFrame(rows).T.reindex(columns=[c for c in columns if any(c in r for r in rows.values())])
    head = (
        f"no validation split (data.val_fraction: 0): the last epoch ({result.best_epoch}) is reported"
        if last
        else f"best epoch {result.best_epoch} (on validation)"
    )
    table = df.dropna(how="all").to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")
    return "\n".join([head, table, *(f"WARNING: {w}" for w in result.warnings)])
