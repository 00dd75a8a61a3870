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


def test_arms_with_unmatched_seeds_are_compared_on_their_common_seeds(tmp_path: Path) -> None:
    """Issue #31, item 3: a study stopped by a timeout with 3 runs of the baseline and 2 of the other arm;
    the comparison table's mean, the ablation's Δ and the paired column agree (common seeds), and say so."""
    runs = {(ARMS[0], None): [0.40, 0.41, 0.30], (ARMS[1], None): [0.45, 0.43]}
    write_store(tmp_path, "timeout", meta(), runs)
    folder = report.write_report("timeout", results=tmp_path)
    comparison = pd.read_csv(folder / "tables/comparison.csv", index_col="arm")
    assert list(comparison.runs) == [2, 2]
    assert comparison.loc[ARMS[0], "recall@1_mean"] == pytest.approx(0.405)  # not the 3-seed mean 0.37
    ab = pd.read_csv(folder / "tables/ablation_synthesis.csv", index_col="arm")
    sig = pd.read_csv(folder / "tables/significance.csv", index_col=["arm", "metric"])
    paired = sig.loc[(ARMS[1], "recall@1")]
    assert ab.loc[ARMS[1], "recall@1_delta"] == pytest.approx(paired.delta) == pytest.approx(0.035)
    text = (folder / "report.md").read_text()
    assert "compared on their common seeds 0, 1 only" in text and "1 runs of other seeds left out" in text
    assert f"Incomplete arms: {ARMS[1]} (seeds 0, 1 of 0, 1, 2)" in text


def test_arms_without_a_common_seed_are_marked_incomplete() -> None:
    final = pd.DataFrame({"arm": ["a", "a", "b"], "seed": [0, 1, 2], "test/recall@1": [0.1, 0.2, 0.3]})
    kept, note = report.matched_seeds(final, ["a", "b"])
    assert len(kept) == 3 and note is not None
    assert "a (seeds 0, 1 of 0, 1, 2); b (seeds 2 of 0, 1, 2)" in note and "not comparable" in note
    assert report.matched_seeds(final[final.arm == "a"], ["a"])[1] is None


def test_factorial_effects_at_every_level_and_the_interaction(tmp_path: Path) -> None:
    """Issue #31, item 4: in loss × synthesis the effect of synthesis is shown with multi-similarity too (not
    only at the baseline's loss), and the interaction of the two factors."""
    levels = [(loss, synth) for loss in ("triplet", "ms") for synth in ("none", "symm")]
    labels = [f"loss={loss}, synthesis={synth}" for loss, synth in levels]
    study_meta = meta(
        factors=["loss", "synthesis"],
        arms=[
            {"label": lab, "values": {"loss": lo, "synthesis": sy}, "display": {"loss": lo, "synthesis": sy}}
            for lab, (lo, sy) in zip(labels, levels, strict=True)
        ],
        baseline=labels[0],
    )
    import optuna

    from harness import store

    study = optuna.create_study(
        study_name="factorial", storage=store.open_storage(None, "factorial", tmp_path, create=True)
    )
    study.set_user_attr("meta", study_meta)
    for arm, mean in zip(study_meta["arms"], [0.40, 0.45, 0.50, 0.52], strict=True):
        for seed, noise in enumerate([0.0, 0.01, -0.01]):
            attrs = {"stage": "final", "arm": arm["label"], "seed": seed, "arm_display": arm["display"]}
            attrs["metrics"] = {"test/recall@1": mean + noise}
            study.add_trial(optuna.trial.create_trial(value=mean + noise, user_attrs=attrs))
    folder = report.write_report("factorial", results=tmp_path)
    eff = pd.read_csv(folder / "tables/effects.csv", index_col=["factor", "change", "at"])
    assert eff.loc[("synthesis", "none → symm", "loss=triplet"), "delta"] == pytest.approx(0.05)
    assert eff.loc[("synthesis", "none → symm", "loss=ms"), "delta"] == pytest.approx(0.02)
    assert eff.loc[("loss", "triplet → ms", "synthesis=symm"), "delta"] == pytest.approx(0.07)
    assert set(eff.n) == {3}
    inter = pd.read_csv(folder / "tables/interactions.csv", index_col=["factors", "levels", "at"])
    row = inter.loc[("loss × synthesis", "loss: triplet → ms, synthesis: none → symm", "—")]
    assert row.delta == pytest.approx(0.02 - 0.05)
    text = (folder / "report.md").read_text()
    assert "## Effects at every level of the other factors" in text and "## Interactions" in text


def test_time_columns_give_images_per_second_and_say_what_they_include() -> None:
    """Issue #31, item 7: the trials table has each arm's training images/s (from the runs' timings, as the
    history's ``images_per_s``), and the report says what the time figures include."""
    from harness import config, train
    from harness.reporting import search

    cfg = config.validate(
        {
            "data": {"dataset": {"name": "synthetic", "num_classes": 8, "per_class": 4, "size": 8}},
            "sampler": {"p": 2, "k": 2, "batches_per_epoch": 2},
            "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
            "model": {"name": "embedder", "embedding_dim": 8},
            "train": {"epochs": 2, "device": "cpu"},
            "eval": {"nmi": False},
        }
    )
    result = train.run(cfg)
    per_epoch = sum(h["images_per_s"] * h["train_s"] for h in result.history) / result.timings["train_s"]
    assert result.timings["images_per_s"] == pytest.approx(per_epoch) and per_epoch > 0
    df = pd.DataFrame(
        {
            "arm": ["a", "a", "b"],
            "stage": "final",
            "state": "COMPLETE",
            "time/epoch_s": [2.0, 4.0, 1.0],
            "time/images_per_s": [100.0, 50.0, 300.0],
        }
    )
    table = search.trials_per_arm(df, ["a", "b"])
    assert table["train images/s (final)"].tolist() == [75.0, 300.0]
    assert "wall-clock" in search.TIMES_NOTE and "data loading" in search.TIMES_NOTE
