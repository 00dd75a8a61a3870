"""What a study searched and what each arm got: the sampler, its seed, the tuned parameters, the trials
of every arm by stage and state (a timeout or failures can leave arms with fewer; the report says so) and
the time an epoch took, and the final runs whose embedding collapsed (their numbers measure a degenerate
embedding)."""

from __future__ import annotations

from typing import Any

import pandas as pd


def search_line(meta: dict[str, Any]) -> str:
    """One sentence: what was tuned, by which sampler and pruner, from which study seed."""
    if not meta.get("n_trials"):
        return f"No tuning stage (study seed {meta.get('seed', 0)})."
    params = ", ".join(f"`{p}`" for p in meta.get("tune_params", []))
    pruner = meta.get("pruner") or "none"
    return (
        f"Search: {meta['n_trials']} trials per arm over {params}, sampler {meta.get('sampler', 'tpe')} "
        f"seeded from study seed {meta.get('seed', 0)} (one seed per arm and slot, recorded on each trial), "
        f"pruner {pruner}."
    )


#: Run timings (``train.RunResult.timings`` as ``store.load`` names them) the trials table shows per arm.
EPOCH_TIMES = {
    "time/epoch_s": "s/epoch (final)",
    "time/mining_epoch_s": "mining s/epoch (final)",
    "time/images_per_s": "train images/s (final)",
}
#: What the time columns measure, printed under the table: wall clock, so they depend on the machine's load.
TIMES_NOTE = (
    "Time columns: wall-clock means over each arm's complete final runs. s/epoch is a training epoch (the "
    "training loop with its data loading, plus offline mining where an arm mines; validation not included); "
    "train images/s is the training images of the loop per second of it. Both include waits for data and "
    "for the CPUs and GPUs other processes were using while the arm ran: compare arms by them only when "
    "their runs shared the machine alike (`dmlh bench` measures speed in isolation)."
)


def trials_per_arm(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows = arms (study order), columns = ``<stage> <state>`` counts (lost-worker and duplicate copies
    left out), e.g. ``tune COMPLETE``, ``tune PRUNED``, ``final COMPLETE``; then what a training epoch of
    the arm's complete final runs took on average, offline mining included, and of it the mining (where
    the runs recorded it)."""
    kept = df[~df["lost"]] if "lost" in df else df
    if "protocol" in kept:
        stage = kept["stage"].where(kept["protocol"].fillna("fair") != "literature", "literature")
    else:
        stage = kept["stage"]
    counts = pd.crosstab(kept["arm"], stage + " " + kept["state"].astype(str))
    counts = counts.reindex([a for a in order if a in counts.index] + sorted(set(counts.index) - set(order)))
    final = kept[(kept["stage"] == "final") & (kept["state"] == "COMPLETE")]
    for col, title in EPOCH_TIMES.items():
        seconds = pd.to_numeric(final[col], errors="coerce") if col in final else pd.Series(dtype=float)
        if (seconds > 0).any():  # no mining column for a study without offline mining
            counts[title] = seconds.groupby(final["arm"]).mean().round(2)
    return counts


#: Per-run flags (1.0: raised) of the final runs and the report's warning for the arms with flagged runs.
FLAGS = {
    "train/collapsed": (
        "collapsed embeddings** (different-class distances near 0 at the last epoch)",
        "Their numbers measure a degenerate embedding: lower the learning rate or check the loss.",
    ),
    "train/synthesis_inert": (
        "symmetrical synthesis without effect** (no reflection was ever harder than the originals)",
        "Those runs trained as without synthesis: their numbers are the loss alone (check synthesis.alpha / "
        "beta and sampler.k).",
    ),
}


def flag_lines(final: pd.DataFrame) -> list[str]:
    """A warning per raised flag (``FLAGS``) naming the arms with final runs that raised it (none when no
    run did)."""
    lines = []
    for column, (what, meaning) in FLAGS.items():
        if column not in final:
            continue
        hit = final[pd.to_numeric(final[column], errors="coerce") > 0]
        if hit.empty:
            continue
        per_arm = hit.groupby("arm").size()
        total = final.groupby("arm").size()
        arms = "; ".join(f"{a} ({n} of {total[a]} runs)" for a, n in per_arm.items())
        lines += [f"**Warning: {what} in {arms}. {meaning}", ""]
    return lines
