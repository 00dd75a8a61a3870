"""``dmlh study status``: what a study's store holds so far, read from the results store (a report)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness import store


def status(name: str, storage: str | None = None, results: str | Path = "results") -> str:
    """Counts by stage and state, the best arms so far (validation objective for tune, test mean over seeds
    for final) and the time spent."""
    df = store.load(name, storage, results)
    meta = df.attrs["meta"]
    metric = meta.get("metric", "recall@1")
    lines = [f"study {name}: {len(df)} trials"]
    if df.empty:
        return lines[0] + " (none started yet)"
    counts = df.groupby(["stage", "state"]).size().unstack(fill_value=0)
    lines += ["", counts.to_string()]
    tune = df[(df.stage == "tune") & (df.state == "COMPLETE")]
    if not tune.empty:
        best = tune.groupby("arm")["value"].agg(["max", "count"]).sort_values("max", ascending=False)
        best.columns = [f"best val/{metric}", "trials"]
        lines += ["", "tune (validation classes):", best.to_string(float_format=lambda v: f"{v:.4f}")]
    final = df[(df.stage == "final") & (df.state == "COMPLETE")]
    col = f"test/{metric}"
    if not final.empty and col in final:
        agg = final.groupby("arm")[col].agg(["mean", "std", "count"]).sort_values("mean", ascending=False)
        agg.columns = [f"{col} mean", "std", "seeds"]
        lines += [
            "",
            "final (test classes, mean ± std over seeds):",
            agg.to_string(float_format=lambda v: f"{v:.4f}"),
        ]
    failed = df[(df.state == "FAIL") & ~df.lost]
    if not failed.empty:
        lines += ["", "failed:"] + [
            f"  #{r.number} {r.arm} ({r.stage}): {r.reason}" for r in failed.itertuples()
        ]
    start, end = df.datetime_start.min(), df.datetime_complete.max()
    wall = (end - start).total_seconds() if pd.notna(start) and pd.notna(end) else math.nan
    lines += ["", f"time: {df.duration.sum():.1f}s in trials, {wall:.1f}s from first start to last end"]
    return "\n".join(lines)
