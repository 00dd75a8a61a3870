"""Paired statistics of an arm against the baseline: numbers against scipy and a naive exact Wilcoxon, and
the significance columns of the report's tables (hand-written store)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from test_report_paper import ARMS, meta, write_store

from harness import report
from harness.reporting import stats

ARM = np.array([0.50, 0.52, 0.55, 0.51, 0.49, 0.53, 0.56, 0.50])
BASE = np.array([0.48, 0.50, 0.50, 0.52, 0.47, 0.50, 0.51, 0.49])


def naive_wilcoxon(d: np.ndarray) -> float:
    """Exact two-sided signed-rank p-value: every sign assignment of the ranks, counted by a loop."""
    ranks = scipy.stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    total = ranks.sum()
    extreme = 0
    signs = list(itertools.product((0, 1), repeat=len(d)))
    for s in signs:
        w = sum(r for r, bit in zip(ranks, s, strict=True) if bit)
        extreme += abs(w - total / 2) >= abs(observed - total / 2) - 1e-12
    return extreme / len(signs)


def test_paired_t_test_and_its_interval_match_scipy() -> None:
    c = stats.paired_comparison(ARM, BASE)
    ref = scipy.stats.ttest_rel(ARM, BASE)
    ci = ref.confidence_interval(0.95)
    assert c.n == 8 and c.delta == pytest.approx((ARM - BASE).mean())
    assert c.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert c.distinguishable == (ref.pvalue < 0.05)


def test_wilcoxon_matches_scipy_and_the_exact_enumeration() -> None:
    c = stats.paired_comparison(ARM, BASE)
    d = ARM - BASE
    assert c.p_wilcoxon == pytest.approx(scipy.stats.wilcoxon(d).pvalue, rel=1e-10)
    assert c.p_wilcoxon == pytest.approx(naive_wilcoxon(d), rel=1e-10)
    # below MIN_WILCOXON seeds it cannot reach p < 0.05 (min 2 / 2**n) and is not reported
    assert 2 / 2 ** (stats.MIN_WILCOXON - 1) > 0.05 > 2 / 2**stats.MIN_WILCOXON
    assert math.isnan(stats.paired_comparison(ARM[:3], BASE[:3]).p_wilcoxon)


def test_bootstrap_interval_agrees_with_scipy_and_a_loop() -> None:
    d = ARM - BASE
    lo, hi = stats.bootstrap_mean_ci(d, n_boot=20_000, seed=1)
    ref = scipy.stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000, random_state=1)
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1.5e-3)
    rng = np.random.default_rng(1)  # the same draws, one resample at a time
    idx = rng.integers(0, len(d), size=(20_000, len(d)))
    loop = np.quantile([d[row].mean() for row in idx], [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(loop), rel=1e-12)


def test_degenerate_pairs() -> None:
    one = stats.paired_comparison([0.5], [0.4])
    assert one.n == 1 and one.delta == pytest.approx(0.1) and math.isnan(one.p_t) and not one.distinguishable
    same = stats.paired_comparison([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # every seed +0.1: no noise
    assert same.p_t == 0.0 and same.ci_low == pytest.approx(0.1) and same.distinguishable
    equal = stats.paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert equal.p_t == 1.0 and not equal.distinguishable
    assert "no test" in stats.caveat(1) and "Wilcoxon needs" in stats.caveat(3)


def test_significance_pairs_arms_with_the_baseline_on_common_seeds() -> None:
    final = pd.DataFrame(
        {
            "arm": ["b"] * 4 + ["x"] * 3,
            "seed": [0, 1, 2, 3, 1, 2, 3],
            "test/recall@1": [0.1, 0.2, 0.3, 0.4, 0.25, 0.33, 0.46],
        }
    )
    sig = stats.significance(final, ["recall@1"], "b", ["b", "x"])
    assert list(sig.index) == [("x", "recall@1")]
    row = sig.loc[("x", "recall@1")]
    ref = scipy.stats.ttest_rel([0.25, 0.33, 0.46], [0.2, 0.3, 0.4])
    assert (
        row.n == 3
        and row.p_t == pytest.approx(ref.pvalue)
        and row.delta == pytest.approx((0.25 + 0.33 + 0.46) / 3 - 0.3)
    )


def test_ablation_and_significance_tables_show_ci_and_p(tmp_path: Path) -> None:
    runs = {(ARMS[0], None): list(BASE), (ARMS[1], None): list(ARM)}
    write_store(tmp_path, "sig", {**meta(), "seeds": list(range(8))}, runs)
    folder = report.write_report("sig", results=tmp_path)
    ref = scipy.stats.ttest_rel(ARM, BASE)
    ab = pd.read_csv(folder / "tables/ablation_synthesis.csv", index_col="arm")
    assert ab.loc[ARMS[1], "recall@1_p_t"] == pytest.approx(ref.pvalue)
    assert ab.loc[ARMS[1], "recall@1_distinguishable"] and not ab.loc[ARMS[0], "recall@1_distinguishable"]
    md = (folder / "tables/ablation_synthesis.md").read_text()
    ci = ref.confidence_interval()
    assert f"(+{100 * (ARM - BASE).mean():.1f}*)" in md
    assert f"[{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] | {ref.pvalue:.3f} / " in md
    sig = pd.read_csv(folder / "tables/significance.csv", index_col=["arm", "metric"])
    assert sig.loc[(ARMS[1], "recall@1"), "p_wilcoxon"] == pytest.approx(
        scipy.stats.wilcoxon(ARM - BASE).pvalue
    )
    text = (folder / "report.md").read_text()
    assert "## Significance against the baseline" in text and "8 paired seeds" in text
    assert "\\toprule" in (folder / "tables/significance.tex").read_text()


def test_three_seeds_are_worded_honestly(tmp_path: Path) -> None:
    runs = {(ARMS[0], None): list(BASE[:3]), (ARMS[1], None): list(ARM[:3])}
    write_store(tmp_path, "few", meta(), runs)
    text = (report.write_report("few", results=tmp_path) / "report.md").read_text()
    assert "3 paired seeds: the t-test has 2 degree(s) of freedom" in text and "Wilcoxon needs ≥ 6" in text


def test_collapsed_and_inert_synthesis_final_runs_are_warnings_in_the_report() -> None:
    import pandas as pd

    from harness.reporting.search import flag_lines

    final = pd.DataFrame({"arm": ["a", "a", "b"], "train/collapsed": [1.0, 0.0, 0.0]})
    (line, _) = flag_lines(final)
    assert "collapsed embeddings" in line and "a (1 of 2 runs)" in line and "b (" not in line
    assert flag_lines(final.assign(**{"train/collapsed": 0.0})) == []
    assert flag_lines(final.drop(columns="train/collapsed")) == []
    both = final.assign(**{"train/synthesis_inert": [0.0, float("nan"), 1.0]})
    collapsed, _, inert, _ = flag_lines(both)
    assert "collapsed" in collapsed and "synthesis without effect" in inert and "in b (1 of 1 runs)" in inert
