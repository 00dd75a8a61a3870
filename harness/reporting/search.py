"""What a study searched and what each arm got: the sampler, its seed, the tuned parameters, and the trials
of every arm by stage and state (a timeout or failures can leave arms with fewer; the report says so)."""

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


def trials_per_arm(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows = arms (study order), columns = ``<stage> <state>`` counts (lost-worker and duplicate copies
    left out), e.g. ``tune COMPLETE``, ``tune PRUNED``, ``final COMPLETE``."""
    kept = df[~df["lost"]] if "lost" in df else df
    if "protocol" in kept:
        stage = kept["stage"].where(kept["protocol"].fillna("fair") != "literature", "literature")
    else:
        stage = kept["stage"]
    counts = pd.crosstab(kept["arm"], stage + " " + kept["state"].astype(str))
    return counts.reindex([a for a in order if a in counts.index] + sorted(set(counts.index) - set(order)))
