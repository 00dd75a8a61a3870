"""The per-learner table of an ensemble study (ABE's individual learners vs the ensemble): each arm's test
Recall@K and MAP@R of every learner alone (``test_learner<m>/…``, from ``train.run``) beside the ensemble's
(``test/…``), mean ± sample std over the final runs' seeds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from harness.reporting.tables import pm
from harness.types import TABLE_METRICS, metric_title, recall_k

#: A learner's test metric column of the store: ``test_learner<m>/<metric>``.
LEARNER_COLUMN = re.compile(r"^test_learner(\d+)/(.+)$")
ENSEMBLE = "ensemble"


def _metric_order(metric: str) -> tuple[int, int]:
    """Recall@K by K, then the other table metrics in ``TABLE_METRICS`` order."""
    k = recall_k(metric)
    return (0, k) if k is not None else (1, TABLE_METRICS.index(metric))


def learner_summary(final: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Rows = (arm, metric) for the arms whose runs scored learners (study order); columns
    ``learner<m>_mean``/``_std`` for m = 1 … the largest M and ``ensemble_mean``/``_std`` (ddof=1 over seeds).
    An arm with fewer learners has NaN in the others; empty when no run scored learners."""
    found = {c: LEARNER_COLUMN.match(c) for c in final.columns}
    columns = {
        c: (int(m[1]), m[2])
        for c, m in found.items()
        if m and (recall_k(m[2]) is not None or m[2] in TABLE_METRICS)
    }
    if not columns:
        return pd.DataFrame()
    learners = final[["arm", *columns]].melt(id_vars="arm", var_name="column").dropna(subset="value")
    learners["learner"] = learners.column.map(lambda c: f"learner{columns[c][0]}")
    learners["metric"] = learners.column.map(lambda c: columns[c][1])
    metrics = sorted(set(learners.metric), key=_metric_order)
    ensemble = final.loc[final.arm.isin(set(learners.arm)), ["arm", *(f"test/{m}" for m in metrics)]]
    ensemble = ensemble.melt(id_vars="arm", var_name="column").assign(learner=ENSEMBLE)
    ensemble["metric"] = ensemble.column.str.removeprefix("test/")
    stats = (
        pd.concat([learners, ensemble])
        .groupby(["arm", "metric", "learner"])
        .value.agg(["mean", "std"])
        .unstack("learner")
    )
    names = [f"learner{m}" for m in range(1, max(n for n, _ in columns.values()) + 1)] + [ENSEMBLE]
    stats = stats.reindex(columns=pd.MultiIndex.from_product([["mean", "std"], names]))
    stats.columns = [f"{n}_{s}" for s, n in stats.columns]
    stats = stats[[f"{n}_{s}" for n in names for s in ("mean", "std")]]
    rows = [(a, m) for a in order for m in metrics if (a, m) in stats.index]
    return stats.reindex(pd.MultiIndex.from_tuples(rows, names=["arm", "metric"]))


def learner_display(summary: pd.DataFrame, titles: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The readable table: arm (by its ``titles``), metric, then ``mean ± std`` in % per learner and the
    ensemble (blank where an arm has no such learner)."""
    rows = summary.reset_index()
    titles = titles or {}
    show = pd.DataFrame(
        {"arm": [titles.get(a, a) for a in rows.arm], "metric": rows.metric.map(metric_title)}
    )
    names = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
    for n in names:
        head = "Ensemble" if n == ENSEMBLE else f"Learner {n.removeprefix('learner')}"
        cells = zip(rows[f"{n}_mean"], rows[f"{n}_std"], strict=True)
        show[head + " (%)"] = ["" if pd.isna(mu) else pm(mu, sd) for mu, sd in cells]
    return show
