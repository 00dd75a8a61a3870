"""Is an arm's difference from the baseline larger than seed noise? Paired statistics over matched seeds.

Each arm is paired with the baseline on the seeds both ran (the same seed means the same data order,
initialisation and augmentation draws, so pairing removes that shared noise). For the mean difference Δ:
a Student-t 95% confidence interval and the paired t-test's two-sided p-value, the Wilcoxon signed-rank
p-value (exact for small n; only from ``MIN_WILCOXON`` pairs, below which it cannot reach p < 0.05), and a
percentile bootstrap CI (descriptive for few seeds: 3 seeds give only 10 distinct resamples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.stats
from numpy.typing import ArrayLike

from harness.types import metric_title

#: The fewest pairs for which the exact two-sided Wilcoxon p-value can be below 0.05 (its minimum is 2 / 2**n:
#: 0.0625 at n = 5, 0.031 at n = 6).
MIN_WILCOXON = 6
#: Significance level of the tables' marks and the confidence level of their intervals.
ALPHA = 0.05
N_BOOT = 10_000


@dataclass(frozen=True)
class PairedComparison:
    """Arm − baseline over ``n`` matched seeds (NaN where ``n`` is too small for the statistic)."""

    n: int
    delta: float
    ci_low: float
    ci_high: float
    boot_low: float
    boot_high: float
    p_t: float
    p_wilcoxon: float

    @property
    def distinguishable(self) -> bool:
        """The paired t-test rejects "no difference" at ``ALPHA`` (equivalently the t-CI excludes 0)."""
        return not math.isnan(self.p_t) and self.p_t < ALPHA


def bootstrap_mean_ci(
    values: ArrayLike, *, level: float = 1 - ALPHA, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampled with replacement, vectorised)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_comparison(
    arm: ArrayLike, base: ArrayLike, *, level: float = 1 - ALPHA, n_boot: int = N_BOOT, seed: int = 0
) -> PairedComparison:
    """Statistics of ``arm - base`` (same length, element i of both from the same seed)."""
    d = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    n = len(d)
    nan = math.nan
    delta = float(d.mean()) if n else nan
    ci_low = ci_high = p_t = p_w = nan
    if n >= 2:
        se = float(d.std(ddof=1)) / math.sqrt(n)
        if se > 0:
            t = delta / se
            p_t = float(2 * scipy.stats.t.sf(abs(t), n - 1))
            half = float(scipy.stats.t.ppf((1 + level) / 2, n - 1)) * se
            ci_low, ci_high = delta - half, delta + half
        else:  # every seed moved by the same amount: no noise to test against
            ci_low = ci_high = delta
            p_t = 1.0 if delta == 0 else 0.0
    if n >= MIN_WILCOXON and np.any(d != 0):
        p_w = float(scipy.stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    boot = bootstrap_mean_ci(d, level=level, n_boot=n_boot, seed=seed)
    return PairedComparison(n, delta, ci_low, ci_high, *boot, p_t, p_w)


def significance(final: pd.DataFrame, metrics: list[str], baseline: str, order: list[str]) -> pd.DataFrame:
    """Rows = (arm, metric) for every arm but the baseline; columns = the fields of ``PairedComparison`` and
    ``distinguishable``, each arm paired with the baseline on the seeds both completed."""
    rows = []
    base = final[final.arm == baseline].set_index("seed")
    for arm in order:
        if arm == baseline:
            continue
        mine = final[final.arm == arm].set_index("seed")
        seeds = sorted(set(mine.index) & set(base.index))
        for m in metrics:
            col = f"test/{m}"
            c = paired_comparison(mine.loc[seeds, col].to_numpy(float), base.loc[seeds, col].to_numpy(float))
            rows.append({"arm": arm, "metric": m, **asdict(c), "distinguishable": c.distinguishable})
    cols = ["arm", "metric", *PairedComparison.__dataclass_fields__, "distinguishable"]
    return pd.DataFrame(rows, columns=cols).set_index(["arm", "metric"])


def holm(p: ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values (the family-wise error stays ≤ α when each is compared with α);
    NaN (no test) stays NaN and does not count in the family."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, math.nan)
    tested = ~np.isnan(p)
    m = int(tested.sum())
    order = np.argsort(p[tested], kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[tested][order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    out[tested] = adjusted
    return out


def bold_cells(long: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """Which cells of a table the data lets a reader call best: per ``column``, the ``row`` with the highest
    mean and every row a paired t-test over seeds does not find worse than it (Holm-corrected across every
    test of the table). ``long`` has one value per (``column``, ``row``, ``seed``) (fractions, shown in %
    with ``decimals``). Equal values as shown are bold alike; a row with fewer than 2 seeds in common with
    the best cannot be tested and is bold (the tables mark it for its few seeds).

    Returns, indexed by (column, row) in input order: ``n`` (seeds), ``mean``, ``delta`` and ``p`` (the paired
    t-test against the column's best on common seeds; NaN for the best and untested rows), ``p_holm`` and
    ``bold``."""
    cells = long.dropna(subset=["value"]).groupby(["column", "row", "seed"], sort=False).value.mean()
    rows = []
    for column, col in cells.groupby(level="column", sort=False):
        by_row = {r: s.droplevel(["column", "row"]) for r, s in col.groupby(level="row", sort=False)}
        means = {r: float(s.mean()) for r, s in by_row.items()}
        best = max(means, key=lambda r: means[r])
        for r, s in by_row.items():
            common = s.index.intersection(by_row[best].index)
            c = paired_comparison(s[common].to_numpy(float), by_row[best][common].to_numpy(float))
            untested = r == best or c.n < 2
            rows.append(
                {
                    "column": column,
                    "row": r,
                    "n": len(s),
                    "mean": means[r],
                    "delta": math.nan if r == best else c.delta,
                    "p": math.nan if untested else c.p_t,
                    "tie": f"{means[r] * 100:.{decimals}f}" == f"{means[best] * 100:.{decimals}f}",
                }
            )
    out = pd.DataFrame(rows, columns=["column", "row", "n", "mean", "delta", "p", "tie"])
    out["p_holm"] = holm(out.p.to_numpy(float))
    worse = (out.p_holm < ALPHA) & (out.delta < 0)
    out["bold"] = out.tie | ~worse
    return out.drop(columns="tie").set_index(["column", "row"])


def caveat(n: int) -> str:
    """Honest wording of what ``n`` paired seeds can show."""
    if n < 2:
        return f"{n} paired seed(s): no test is possible; run more seeds."
    text = (
        f"{n} paired seeds: the t-test has {n - 1} degree(s) of freedom and assumes normal seed noise; "
        "a difference it does not mark may still be real."
    )
    if n < MIN_WILCOXON:
        text += f" Wilcoxon needs ≥ {MIN_WILCOXON} seeds to reach p < {ALPHA} (not shown)."
    if n < 10:
        text += " The bootstrap CI over so few seeds is too narrow; read it as descriptive."
    return text


def format_p(p: float, na: str = "—") -> str:
    """A p-value for a table (``< 0.001`` below that, ``na`` when there is none)."""
    return na if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def interval(lo: float, hi: float, na: str = "—") -> str:
    """A confidence interval of a difference, in points."""
    return na if math.isnan(lo) else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def verdict(c: pd.Series) -> str:
    """``distinguishable`` / ``not distinguishable`` from seed noise, or ``no test`` (fewer than 2 pairs)."""
    if c.n < 2 or math.isnan(c.p_t):
        return "no test"
    return "distinguishable" if c.distinguishable else "not distinguishable"


def significance_display(sig: pd.DataFrame, titles: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The readable significance table: Δ and CIs in points, p-values, and the verdict against seed noise;
    arms by their ``titles``."""
    rows = sig.reset_index()
    titles = titles or {}
    return pd.DataFrame(
        {
            "arm": [titles.get(a, a) for a in rows.arm],
            "metric": [metric_title(m) for m in rows.metric],
            "seeds": rows.n.astype(int),
            "Δ (points)": ["—" if math.isnan(v) else f"{100 * v:+.1f}" for v in rows.delta],
            "95% CI, t": [interval(lo, hi) for lo, hi in zip(rows.ci_low, rows.ci_high, strict=True)],
            "95% CI, bootstrap": [
                interval(lo, hi) for lo, hi in zip(rows.boot_low, rows.boot_high, strict=True)
            ],
            "p, paired t": [format_p(p) for p in rows.p_t],
            "p, Wilcoxon": [format_p(p) for p in rows.p_wilcoxon],
            "vs seed noise": [verdict(r) for _, r in rows.iterrows()],
        }
    )
