"""Warnings about weak numbers, said once at the top of a report and once in the log: parameter importances
from few tune trials, validation on few classes or at a saturated metric (the tuning and the epoch
selection then rest on little), and arms with few seeds (a mean ± std, and a paired test, over two seeds
says little)."""

from __future__ import annotations

import pandas as pd

from harness.types import metric_title

#: Below these a number is weak: tune trials behind an arm's importances, validation classes, seeds of an arm.
MIN_TRIALS, MIN_VAL_CLASSES, MIN_SEEDS = 20, 5, 3
#: A validation metric at or above this is saturated; it is a caveat when most runs that selected on it are.
SATURATED = 0.99


def _per_arm(counts: pd.Series, total: int) -> str:
    """``n each`` when every one of the ``total`` arms has the same count, else ``arm: n; ...``."""
    if len(counts) == total and counts.nunique() == 1:
        return f"{counts.iloc[0]} each"
    return "; ".join(f"{arm}: {n}" for arm, n in counts.items())


def importance_caveat(df: pd.DataFrame, importances: pd.DataFrame) -> str | None:
    """Importances computed for arms with fewer than ``MIN_TRIALS`` complete tune trials."""
    if importances.empty:
        return None
    tune = df[(df.stage == "tune") & (df.state == "COMPLETE")]
    trials = tune.groupby("arm").size().reindex(importances.arm.unique()).fillna(0).astype(int)
    few = trials[trials < MIN_TRIALS]
    if few.empty:
        return None
    return (
        f"Parameter importances rest on fewer than {MIN_TRIALS} tune trials per arm "
        f"({_per_arm(few, len(trials))}): read them as a rough hint, not a ranking."
    )


def validation_caveats(df: pd.DataFrame, metric: str) -> list[str]:
    """Validation on fewer than ``MIN_VAL_CLASSES`` classes; a validation metric that is saturated (at
    least ``SATURATED``) in most tune trials (without tuning: most final runs), so it cannot tell the
    configurations or epochs apart."""
    done = df[df.state == "COMPLETE"]
    out = []
    if "data/val_classes" in done and done["data/val_classes"].notna().any():
        classes = int(done["data/val_classes"].min())
        if classes < MIN_VAL_CLASSES:
            out.append(
                f"Validation on {classes} classes (fewer than {MIN_VAL_CLASSES}): the tuning and the epoch "
                "selection rest on very few classes; more validation classes (`data.val_fraction`) make "
                "them steadier."
            )
    tune = done[done.stage == "tune"]
    runs, what = (tune, "tune trials") if len(tune) else (done[done.stage == "final"], "final runs")
    column = f"val/{metric}"
    values = runs[column].dropna() if column in runs else pd.Series(dtype=float)
    high = int((values >= SATURATED).sum())
    if len(values) and high > len(values) / 2:
        out.append(
            f"Validation {metric_title(metric)} is at least {100 * SATURATED:.0f}% in {high} of "
            f"{len(values)} {what}: saturated, it can barely tell the configurations (and epochs) apart, so "
            "they were chosen almost at random; use more or harder validation classes."
        )
    return out


def seed_caveat(final: pd.DataFrame) -> str | None:
    """Arms whose table numbers come from fewer than ``MIN_SEEDS`` seeds."""
    seeds = final.groupby("arm", sort=False)["seed"].nunique()
    few = seeds[seeds < MIN_SEEDS]
    if few.empty:
        return None
    return (
        f"Fewer than {MIN_SEEDS} seeds in {len(few)} of {len(seeds)} arms "
        f"({_per_arm(few, len(seeds))}): their mean ± std is a weak estimate and the paired tests between "
        "arms have little power."
    )


def caveats(df: pd.DataFrame, final: pd.DataFrame, metric: str, importances: pd.DataFrame) -> list[str]:
    """Every caveat of a study's numbers (``df``: all its runs; ``final``: the runs its tables show)."""
    found = [importance_caveat(df, importances), *validation_caveats(df, metric), seed_caveat(final)]
    return [c for c in found if c]


def caveat_lines(found: list[str]) -> list[str]:
    """The report's ``Caveats`` section (nothing without caveats)."""
    if not found:
        return []
    return ["## Caveats", "", *(f"- {c}" for c in found), ""]
