"""Per-run files: the record of a run, written atomically (a reader never sees half a run)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from harness.reporting import embeddings

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


def write_run(result: RunResult, directory: str | Path, *, save_checkpoint: bool = False) -> Path:
    """Write config.yaml, metrics.json, history.csv, diagnostics.json (and checkpoint.pt) to ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    (tmp / "config.yaml").write_text(yaml.safe_dump(result.config, sort_keys=False))
    summary = {
        "run_key": result.run_key,
        "best_epoch": result.best_epoch,
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
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def format_metrics(result: RunResult) -> str:
    """The metrics as a small table: rows = metric, columns = val / test / test_last."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in result.metrics.items():
        split, _, metric = key.partition("/")
        rows.setdefault(metric, {})[split] = value
    df = pd.DataFrame(rows).T.reindex(
        columns=[c for c in ("val", "test", "test_last") if any(c in r for r in rows.values())]
    )
    return f"best epoch {result.best_epoch}\n" + df.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")
