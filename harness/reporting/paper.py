"""The paper table: published numbers beside ours under the literature and the fair protocol.

A paper study's metadata may carry ``published: {<arm label>: {"source": "Table 2, row 'Triplet'",
"<metric>": <value in %>, ...}}`` and ``unpublished: [<setting the papers do not give>, ...]``; each final
run carries the user attribute ``protocol`` (``literature`` or ``fair``; a run without it is ``fair``).
Numbers in the CSV are fractions like every other table of the store (published values divided by 100);
the Markdown and LaTeX versions are in % and Δ in points. A study's ``recipe`` (``harness.study.recipe``) is
printed under the table (``recipe_table``): each setting of the literature protocol with its source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from harness.reporting.tables import DAGGER, MIN_SEEDS, NA, pm
from harness.study.recipe import SOURCE_TITLES, recipe_rows
from harness.types import metric_title, recall_k

#: The two protocols of a paper study (DESIGN.md "Studies"); a run recorded without one is ``fair``.
PROTOCOLS = ("literature", "fair")
DEFAULT_PROTOCOL = "fair"


def protocols(df: pd.DataFrame) -> pd.Series:
    """Each run's protocol (``fair`` where the run did not record one)."""
    if "protocol" not in df:
        return pd.Series(DEFAULT_PROTOCOL, index=df.index, dtype=object)
    return df["protocol"].where(df["protocol"].notna(), DEFAULT_PROTOCOL)


def is_paper_study(df: pd.DataFrame, meta: dict[str, Any]) -> bool:
    """A study with a ``published`` block or any literature-protocol run."""
    return bool(meta.get("published")) or bool((protocols(df) == "literature").any())


def published_metrics(meta: dict[str, Any]) -> list[str]:
    """The metrics some arm's published block gives: Recall@K by K, then the others in first-seen order."""
    names = list(
        dict.fromkeys(k for row in (meta.get("published") or {}).values() for k in row if k != "source")
    )
    recalls = sorted((m for m in names if recall_k(m) is not None), key=lambda m: recall_k(m) or 0)
    return recalls + [m for m in names if recall_k(m) is None]


def paper_table(
    final: pd.DataFrame, metrics: list[str], order: list[str], meta: dict[str, Any]
) -> pd.DataFrame:
    """Rows = (arm, metric) in study order; columns ``source``, ``published``, ``literature_mean``/``_std``/
    ``_n``, ``fair_mean``/``_std``/``_n`` (over seeds, ddof=1), ``delta_literature_published`` and
    ``delta_fair_literature`` (fractions; NaN where a side is missing)."""
    published = meta.get("published") or {}
    proto = protocols(final)
    rows = []
    for arm in order:
        pub = published.get(arm, {})
        for m in metrics:
            row: dict[str, Any] = {"arm": arm, "metric": m, "source": pub.get("source", "")}
            value = pub.get(m)
            row["published"] = float(value) / 100 if value is not None else math.nan
            for p in PROTOCOLS:
                row.update(_seed_stats(final.loc[(final.arm == arm) & (proto == p)], f"test/{m}", p))
            literature = final.loc[(final.arm == arm) & (proto == "literature")]
            row.update(_seed_stats(literature, f"test_best/{m}", "literature_best"))
            row["delta_literature_published"] = row["literature_mean"] - row["published"]
            row["delta_fair_literature"] = row["fair_mean"] - row["literature_mean"]
            rows.append(row)
    return pd.DataFrame(rows).set_index(["arm", "metric"])


def _seed_stats(runs: pd.DataFrame, col: str, prefix: str) -> dict[str, float]:
    """``<prefix>_mean``/``_std`` (ddof=1)/``_ci95``/``_n`` of column ``col`` over the runs (NaN where
    missing). ``_ci95``: the half-width of the 95 % t-interval of the mean over seeds, as A Metric Learning
    Reality Check reports its numbers."""
    values = pd.to_numeric(runs[col], errors="coerce").dropna() if col in runs else pd.Series([], dtype=float)
    n = len(values)
    std = values.std() if n > 1 else math.nan
    return {
        f"{prefix}_mean": values.mean() if n else math.nan,
        f"{prefix}_std": std,
        f"{prefix}_ci95": float(student_t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan,
        f"{prefix}_n": n,
    }


def _cell(mean: float, ci95: float, n: int) -> str:
    """``mean ± CI (n)`` in %, ``†`` from fewer than ``MIN_SEEDS`` seeds; ``NA`` without runs."""
    if math.isnan(mean):
        return NA
    return f"{pm(mean, ci95)} ({n})" + (DAGGER if n < MIN_SEEDS else "")


def _delta(value: float) -> str:
    return NA if math.isnan(value) else f"{100 * value:+.1f}"


def paper_display(table: pd.DataFrame, titles: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The readable paper table: arms by their ``titles``, values in % with ``(n seeds)``, Δ in points, the
    source on each arm's first row."""
    rows = table.reset_index()
    first = ~rows.arm.duplicated()
    titles = titles or {}

    def cells(prefix: str) -> list[str]:
        stats = zip(rows[f"{prefix}_mean"], rows[f"{prefix}_ci95"], rows[f"{prefix}_n"], strict=True)
        return [_cell(m, s, n) for m, s, n in stats]

    has_best = "literature_best_mean" in rows and rows.literature_best_mean.notna().any()
    best = {"ours, literature, best test epoch (%)": cells("literature_best")} if has_best else {}
    return pd.DataFrame(
        {
            "arm": [titles.get(a, a) if f else "" for a, f in zip(rows.arm, first, strict=True)],
            "metric": [metric_title(m) for m in rows.metric],
            "published (%)": [NA if math.isnan(v) else f"{100 * v:.1f}" for v in rows.published],
            "source": [s if f else "" for s, f in zip(rows.source, first, strict=True)],
            "ours, literature (%)": cells("literature"),
            **best,
            "ours, fair (%)": cells("fair"),
            "Δ literature − published": [_delta(v) for v in rows.delta_literature_published],
            "Δ fair − literature": [_delta(v) for v in rows.delta_fair_literature],
        }
    )


#: The paper table's wrapped column in LaTeX (sources are sentences), and the recipe table's.
PAPER_WRAP = {"source": "12em"}
RECIPE_WRAP = {"setting": "10em", "value": "12em", "source / why": "16em"}
#: What the paper table's cells and marks mean (under it).
LEGEND = (
    f"Ours: test metrics in %, mean ± half-width of its 95 % confidence interval over seeds (t-distribution; "
    f"no ± from one seed), the number of seeds in "
    f"parentheses; {DAGGER}: fewer than {MIN_SEEDS} seeds. Published: as printed in the paper. Δ in points. "
    f"{NA}: no result."
)


def paper_caption(name: str, meta: dict[str, Any]) -> str:
    """What the columns mean, and every setting no paper or official code gives (``unpublished``)."""
    shared = meta.get("fair_protocol")  # the study's shared protocol file (harness.study.protocol)
    fair = (
        f"one protocol for every method ({Path(shared['path']).name}: {shared['source']}): the same "
        "backbone, batch, optimizer, augmentation and budget; each method's own hyperparameters tuned with "
        "the same number of trials on validation classes, then retrained on every training class"
        if shared
        else "hyperparameters tuned and epochs selected on validation classes carved from the training "
        "classes"
    )
    text = (
        f"{name}: published numbers beside ours. Literature protocol: every training class, the paper's "
        f"fixed recipe, no tuning. Fair protocol: {fair}. Ours: test metrics in %, mean ± 95 % CI over "
        "seeds "
        "(number of seeds in parentheses); Δ in points. 'Best test epoch' (where shown) selects the epoch on "
        "the test classes, as the paper's official code does: not a fair number"
    )
    unpublished = [str(u) for u in meta.get("unpublished") or []]
    if unpublished:
        text += ". Not published (our choice): " + "; ".join(unpublished)
    return text


def split_by_protocol(final: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The final runs of each protocol present, literature first."""
    proto = protocols(final)
    return {p: final[np.asarray(proto == p)] for p in PROTOCOLS if (proto == p).any()}


def recipe_table(meta: dict[str, Any]) -> pd.DataFrame:
    """The study's recipe, one row per entry: from the paper, then the official code, then ours (each with
    its source or, for ours, why), and the arms an entry is limited to. Empty without a recipe."""
    rows = [
        {
            "from": SOURCE_TITLES[r["kind"]],
            "setting": r["setting"] + (f" ({r['arms']})" if r["arms"] else ""),
            "value": r["value"],
            "source / why": r["source"] if r["kind"] != "ours" else r["why"],
        }
        for r in recipe_rows(meta)
    ]
    return pd.DataFrame(rows, columns=["from", "setting", "value", "source / why"])


def recipe_caption(name: str) -> str:
    """What the recipe table is."""
    return (
        f"{name}: the literature protocol's recipe, every setting that decides the number with its source "
        "(the paper's text, its official code, or ours with the reason), checked against the resolved config "
        "of every arm before the study ran"
    )
