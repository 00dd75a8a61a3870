"""A factorial study's effects: each factor's effect at every level of the other factors, and the
interaction of every pair of factors.

The ablation tables change one factor at the baseline's levels of the others only; in loss × synthesis that
never sets multi-similarity with and without synthesis side by side. Here every arm is compared with the
arm that differs from it in one factor only, that factor set to the baseline's level (its simple effect at
the arm's levels of the others), and every 2×2 of a pair of factors gives the interaction contrast
``(y[a', b'] − y[a, b']) − (y[a', b] − y[a, b])``: how much the effect of one factor changes with the
other's level (0: the effects add up). All paired over the seeds the arms involved have in common (the
same seed: the same data order and initialisation), with the statistics of ``harness.reporting.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from harness.reporting import stats

#: Numeric columns of both tables, after their label columns.
COLUMNS = ("n", "delta", "ci_low", "ci_high", "p_t", "distinguishable")


def _arms(final: pd.DataFrame, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Label → factor levels (as displayed) of the study's arms that have final runs."""
    present = set(final.arm)
    return {a["label"]: a["display"] for a in meta.get("arms", []) if a["label"] in present}


def _paired(wide: pd.DataFrame, plus: Sequence[str], minus: Sequence[str]) -> dict[str, Any]:
    """Paired statistics of Σ plus − Σ minus arms over the seeds all of them completed."""
    cols = [*plus, *minus]
    rows = wide[cols].dropna()
    contrast = rows[list(plus)].sum(axis=1) - rows[list(minus)].sum(axis=1)
    c = stats.paired_comparison(contrast.to_numpy(float), np.zeros(len(contrast)))
    return {
        "n": c.n,
        "delta": c.delta,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "p_t": c.p_t,
        "distinguishable": c.distinguishable,
    }


def _finder(arms: dict[str, dict[str, Any]], factors: list[str]) -> Callable[[dict[str, Any]], str | None]:
    by_levels = {tuple(str(d[f]) for f in factors): label for label, d in arms.items()}
    return lambda levels: by_levels.get(tuple(str(levels[f]) for f in factors))


def _at(levels: dict[str, Any], factors: Sequence[str]) -> str:
    return ", ".join(f"{g}={levels[g]}" for g in factors) or "—"


def simple_effects(final: pd.DataFrame, metric: str, meta: dict[str, Any], baseline: str) -> pd.DataFrame:
    """Rows (factor, change, at): the effect of changing ``factor`` from the baseline's level to another, at
    every combination of the other factors' levels the study ran (``at``); empty for fewer than 2 factors."""
    factors, arms = list(meta.get("factors", [])), _arms(final, meta)
    if len(factors) < 2 or baseline not in arms:
        return pd.DataFrame(columns=["factor", "change", "at", *COLUMNS]).set_index(
            ["factor", "change", "at"]
        )
    wide = final.pivot_table(index="seed", columns="arm", values=f"test/{metric}", aggfunc="mean")
    find, rows = _finder(arms, factors), []
    for f in factors:
        ref, others = arms[baseline][f], [g for g in factors if g != f]
        for label, levels in arms.items():
            partner = find({**levels, f: ref})
            if str(levels[f]) == str(ref) or partner is None:
                continue
            change = f"{ref} → {levels[f]}"
            rows.append(
                {
                    "factor": f,
                    "change": change,
                    "at": _at(levels, others),
                    **_paired(wide, [label], [partner]),
                }
            )
    return pd.DataFrame(rows, columns=["factor", "change", "at", *COLUMNS]).set_index(
        ["factor", "change", "at"]
    )


def interactions(final: pd.DataFrame, metric: str, meta: dict[str, Any], baseline: str) -> pd.DataFrame:
    """Rows (factors, levels, at): the 2×2 interaction contrast of every pair of factors, each changed from
    the baseline's level to another, at every combination of the remaining factors' levels."""
    factors, arms = list(meta.get("factors", [])), _arms(final, meta)
    labels = ["factors", "levels", "at"]
    if len(factors) < 2 or baseline not in arms:
        return pd.DataFrame(columns=[*labels, *COLUMNS]).set_index(labels)
    wide = final.pivot_table(index="seed", columns="arm", values=f"test/{metric}", aggfunc="mean")
    find, rows = _finder(arms, factors), []
    for f, g in combinations(factors, 2):
        ref_f, ref_g = arms[baseline][f], arms[baseline][g]
        rest = [h for h in factors if h not in (f, g)]
        for label, levels in arms.items():
            if str(levels[f]) == str(ref_f) or str(levels[g]) == str(ref_g):
                continue
            a01, a10 = find({**levels, f: ref_f}), find({**levels, g: ref_g})
            a00 = find({**levels, f: ref_f, g: ref_g})
            if a01 is None or a10 is None or a00 is None:
                continue
            rows.append(
                {
                    "factors": f"{f} × {g}",
                    "levels": f"{f}: {ref_f} → {levels[f]}, {g}: {ref_g} → {levels[g]}",
                    "at": _at(levels, rest),
                    **_paired(wide, [label, a00], [a01, a10]),
                }
            )
    return pd.DataFrame(rows, columns=[*labels, *COLUMNS]).set_index(labels)


def effects_display(table: pd.DataFrame) -> pd.DataFrame:
    """Δ and its 95% t-interval in points, the paired t-test's p and the verdict against seed noise."""
    rows = table.reset_index()
    out = pd.DataFrame({c: [str(v) for v in rows[c]] for c in table.index.names})
    out["seeds"] = rows.n.astype(int)
    out["Δ (points)"] = ["—" if math.isnan(v) else f"{100 * v:+.1f}" for v in rows.delta]
    out["95% CI, t"] = [stats.interval(lo, hi) for lo, hi in zip(rows.ci_low, rows.ci_high, strict=True)]
    out["p, paired t"] = [stats.format_p(p) for p in rows.p_t]
    out["vs seed noise"] = [stats.verdict(r) for _, r in rows.iterrows()]
    return out
