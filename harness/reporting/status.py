"""``dmlh study status``: what a study's store holds so far, read from the results store (a report).

Its units of work are counted per arm and stage as finished, running (with the worker that runs it), dead
(claimed by a worker that is gone: a killed study leaves such trials RUNNING in the store), queued and
failed, so a user sees at once whether anything still runs and what the next ``dmlh study run`` will do."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from optuna.trial import FrozenTrial

from harness import store
from harness.study.queue import UnitView, survey

#: The columns of the units table, in this order.
STATES = ("finished", "running", "dead", "queued", "failed")


def status(name: str, storage: str | None = None, results: str | Path = "results") -> str:
    """Units by arm, stage and state, the running and dead trials with their workers, the best arms so far
    (validation objective for tune, test mean over seeds for final), the failures and the time spent."""
    df = store.load(name, storage, results)
    _, folder, opened = store.resolve(name, storage, results)
    views = survey(opened, store.study_names(opened, name), folder)
    meta = df.attrs["meta"]
    metric = meta.get("metric", "recall@1")
    lines = [f"study {name}: {len(df)} trials" + ("" if len(df) else " (none started yet)")]
    lines += _units(views, [a["label"] for a in meta.get("arms", [])])
    if df.empty:
        return "\n".join(lines)
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
    wall = f", {(end - start).total_seconds():.1f}s from first start to last end" if pd.notna(end) else ""
    lines += ["", f"time: {df.duration.sum():.1f}s in trials{wall}"]
    return "\n".join(lines)


def _units(views: list[UnitView], arms: list[str]) -> list[str]:
    """The units table (arm × stage rows, STATES columns, a total row), then one line per running and per
    dead trial naming its worker."""
    if not views:
        return []
    frame = pd.DataFrame([(v.arm, v.stage, v.state) for v in views], columns=["arm", "stage", "state"])
    rank = {arm: i for i, arm in enumerate(arms)} | {"tune": 0, "final": 1}  # the study's arms; tune first
    counts = frame.groupby(["arm", "stage", "state"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=pd.Index(STATES), fill_value=0)
    rows = sorted(counts.index, key=lambda k: (rank.get(k[0], len(rank)), k[0], rank.get(k[1], 2), k[1]))
    counts = counts.loc[rows]
    counts.loc[("total", ""), :] = counts.sum()
    lines = ["", "units of work:", counts.astype(int).to_string(sparsify=False)]
    running = [v for v in views if v.state == "running"]
    dead = [v for v in views if v.state == "dead"]
    if running:
        lines += ["", "running:"] + [f"  {_trial(v)}: {_worker(v.trial)}" for v in running if v.trial]
    if dead:
        lines += ["", "dead (their worker is gone; the next `dmlh study run` re-queues them):"]
        lines += [f"  {_trial(v)}: was {_worker(v.trial)}" for v in dead if v.trial]
    return lines


def _trial(v: UnitView) -> str:
    assert v.trial is not None
    epoch = max(v.trial.intermediate_values, default=None)
    where = f"{v.arm}, {v.stage}" + (f", epoch {epoch}" if epoch is not None else "")
    return f"#{v.trial.number} {v.trial.user_attrs.get('unit', '')} ({where})"


def _worker(t: FrozenTrial | None) -> str:
    """``pid P on HOST`` (and its GPUs) of the worker that claimed ``t``."""
    worker = (t.user_attrs.get("worker") if t else None) or {}
    if not worker:
        return "worker not yet recorded"
    gpus = f" (GPU {worker['gpus']})" if worker.get("gpus") else ""
    return f"worker pid {worker.get('pid')} on {worker.get('host')}{gpus}"
