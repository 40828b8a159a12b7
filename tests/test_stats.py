"""Tests for metalearner/report/stats/ (intervals, pairing, verdicts, power, to_target):
unit tests per function, then calibration.

The calibration tests simulate 2,000 comparisons of 4 arms against a baseline over 5 seeds
with seed-correlated noise (one shared seed effect per seed, as same-seed runs share
initialisation and data order) and check the verdict logic's claims: a family-wise rate of
false "better"/"worse" verdicts <= 5% under the null, and 80% power at the printed minimum
detectable effect, each within 3 Monte-Carlo standard errors. numpy only, well under 20 s.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from metalearner.report import stats as st

N_SIMS = 2000
ALPHA = 0.05


# ---------------------------------------------------------------- the mean and its t interval


def test_ci95_mean_match_scipy_t_interval():
    x = np.array([1.5, 1.4, 1.62, 1.55, np.nan, np.inf])
    fin = x[np.isfinite(x)]
    lo, hi = sps.t.interval(0.95, len(fin) - 1, loc=fin.mean(), scale=sps.sem(fin))
    assert st.ci95(x) == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert st.mean(x) == pytest.approx(fin.mean())
    assert math.isnan(st.ci95([1.0])) and math.isnan(st.mean([np.nan]))


# ---------------------------------------------------------------- IQM and bootstrap


def test_iqm_matches_trim_mean_and_needs_five():
    assert st.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    rng = np.random.default_rng(1)
    for n in range(5, 14):
        x = rng.normal(size=n)
        assert st.iqm(x) == pytest.approx(sps.trim_mean(x, 0.25))
    assert math.isnan(st.iqm([1.0, 2.0, 3.0, 4.0]))
    batch = rng.normal(size=(7, 6))
    np.testing.assert_allclose(st.iqm(batch, axis=-1), sps.trim_mean(batch, 0.25, axis=-1))
    np.testing.assert_allclose(st.iqm(batch.T, axis=0), sps.trim_mean(batch, 0.25, axis=-1))


def test_bootstrap_is_deterministic_and_sensible():
    x = [1.52, 1.47, 1.61, 1.55, 1.49, 1.58]
    a = st.bootstrap_ci(x, "mean", seed=3)
    assert a == st.bootstrap_ci(x, "mean", seed=3)
    y = np.random.default_rng(0).normal(size=30)
    assert st.bootstrap_ci(y, "mean", seed=3) == st.bootstrap_ci(y, "mean", seed=3)
    assert st.bootstrap_ci(y, "mean", seed=3) != st.bootstrap_ci(y, "mean", seed=4)
    assert min(x) <= a[0] < np.mean(x) < a[1] <= max(x)
    q = st.bootstrap_ci(x, "iqm", seed=3)
    assert min(x) <= q[0] <= st.iqm(x) <= q[1] <= max(x)
    assert all(math.isnan(v) for v in st.bootstrap_ci(x[:4], "iqm"))
    assert all(math.isnan(v) for v in st.bootstrap_ci([1.0], "mean"))
    # The percentile interval of the mean approaches the normal one for many seeds.
    big = np.random.default_rng(0).normal(0.0, 1.0, size=400)
    lo, hi = st.bootstrap_ci(big, "mean", n_boot=4000, seed=0)
    assert (hi - lo) / 2 == pytest.approx(st.ci95(big), rel=0.1)


def test_bootstrap_keeps_unreached_runs_and_rejects_nan():
    lo, hi = st.bootstrap_ci([10.0, 11.0, 12.0, np.inf, 10.5], "mean", seed=0)
    assert np.isfinite(lo) and hi == np.inf  # resamples without the unreached seed stay finite
    with pytest.raises(ValueError, match="values: got NaN"):
        st.bootstrap_ci([1.0, np.nan], "mean")
    with pytest.raises(ValueError, match="statistic: got 'mode'"):
        st.bootstrap_ci([1.0, 2.0], "mode")
    with pytest.raises(ValueError, match="n_boot: got 0"):
        st.bootstrap_ci([1.0, 2.0], n_boot=0)


def test_stratified_bootstrap_resamples_within_each_arm():
    ratio = lambda s: s["arm"].mean(axis=-1) / s["base"].mean(axis=-1)  # noqa: E731
    # Constant within each arm: any within-arm resample gives exactly 2 / 4.
    assert st.stratified_bootstrap_ci({"arm": [2.0, 2.0, 2.0], "base": [4.0] * 5}, ratio) == (0.5, 0.5)
    groups = {"arm": [1.0, 2.0, 3.0, 4.0], "base": [4.0, 5.0, 6.0]}
    a = st.stratified_bootstrap_ci(groups, ratio, seed=7)
    assert a == st.stratified_bootstrap_ci(groups, ratio, seed=7)
    assert 1 / 6 <= a[0] < 2.5 / 5 < a[1] <= 4 / 4
    assert all(math.isnan(v) for v in st.stratified_bootstrap_ci({"arm": [1.0], "base": [1.0, 2.0]}, ratio))


def test_summarize_arm():
    x = [1.52, 1.47, 1.61, 1.55, 1.49, 1.58, np.inf]
    s = st.summarize_arm(x, seed=1)
    fin = x[:-1]
    assert s.n == 6 and s.mean == pytest.approx(np.mean(fin)) and s.t_ci95 == pytest.approx(st.ci95(fin))
    assert (s.boot_low, s.boot_high) == st.bootstrap_ci(fin, "mean", seed=1)
    assert s.iqm == pytest.approx(sps.trim_mean(fin, 0.25)) and s.iqm_low <= s.iqm <= s.iqm_high
    small = st.summarize_arm([1.0, 2.0])
    assert math.isnan(small.iqm) and math.isnan(small.iqm_low)


# ---------------------------------------------------------------- paired t, Holm, power


def test_paired_t_vectorized_matches_ttest_rel():
    rng = np.random.default_rng(5)
    d = rng.normal(0.01, 0.03, size=(50, 4, 6))
    delta, half, n, p = st.paired_t(d)
    np.testing.assert_allclose(p, sps.ttest_1samp(d, 0.0, axis=-1).pvalue, rtol=1e-9)
    np.testing.assert_allclose(delta, d.mean(axis=-1))
    np.testing.assert_allclose(half, np.apply_along_axis(st.ci95, -1, d), rtol=1e-12)
    assert (n == 6).all()
    delta, half, n, p = st.paired_t(np.array([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.2, np.nan, np.nan]]))
    assert n.tolist() == [3, 3, 1] and half[0] == 0.0 and p[0] == 0.0 and p[1] == 1.0 and np.isnan(p[2])
    assert np.isnan(half[2]) and delta[2] == pytest.approx(0.2)  # one pair: a difference, no test
    delta, half, n, p = st.paired_t(np.full((1, 3), np.nan))
    assert n.tolist() == [0] and np.isnan(delta[0]) and np.isnan(p[0])  # no pair at all


def test_holm_textbook_example():
    # Wikipedia "Holm–Bonferroni method": p = 0.01, 0.04, 0.03, 0.005 at alpha 0.05:
    # 0.005 <= 0.0125 and 0.01 <= 0.0167 are rejected, 0.03 > 0.025 stops the procedure.
    reject, adjusted = st.holm(np.array([0.01, 0.04, 0.03, 0.005]), 0.05)
    assert reject.tolist() == [True, False, False, True]
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # Vectorized over families, and NaN (no test) counts in m but never rejects.
    reject, adjusted = st.holm(np.array([[0.01, 0.04, 0.03, 0.005], [0.011, np.nan, 0.2, 0.3]]))
    assert reject.tolist() == [[True, False, False, True], [True, False, False, False]]
    assert adjusted[1, 0] == pytest.approx(0.044) and np.isnan(adjusted[1, 1])
    # Step-down is more powerful than Bonferroni: 0.02 rejects at the second step (<= 0.025).
    assert st.holm(np.array([0.001, 0.02]))[0].tolist() == [True, True]


def test_holm_verdicts_take_the_side_of_the_difference():
    v = st.holm_verdicts(np.array([-0.1, 0.1, -0.1, 0.05]), np.array([0.001, 0.002, 0.5, np.nan]))
    assert v.tolist() == ["better", "worse", "no clear difference", "no clear difference"]
    v = st.holm_verdicts(np.array([-0.1, 0.1]), np.array([0.001, 0.002]), lower_is_better=False)
    assert v.tolist() == ["worse", "better"]


def test_mde_matches_scipy_noncentral_t_power():
    for n, sd, m in [(5, 0.03, 4), (2, 0.05, 4), (10, 1.0, 1), (3, 0.01, 2)]:
        mde = st.mde_paired(n, sd, ALPHA, m, 0.8)
        crit = sps.t.ppf(1 - ALPHA / m / 2, n - 1)
        nc = mde * math.sqrt(n) / sd
        power = sps.nct.sf(crit, n - 1, nc) + sps.nct.sf(crit, n - 1, -nc)
        assert power == pytest.approx(0.8, abs=1e-6)
        assert st.power_paired(mde, n, sd, ALPHA, m) == pytest.approx(0.8, abs=1e-9)
        assert st.power_paired(0.0, n, sd, ALPHA, m) == pytest.approx(ALPHA / m, rel=1e-6)
    # The textbook approximation (t_{1-a/2} + t_{power}) sd / sqrt(n) is close for larger n.
    n, sd = 20, 1.0
    approx = (sps.t.ppf(1 - ALPHA / 8, n - 1) + sps.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert st.mde_paired(n, sd, ALPHA, 4) == pytest.approx(approx, rel=0.03)
    assert st.mde_paired(5, 0.03, ALPHA, 4) > st.mde_paired(5, 0.03, ALPHA, 1) > st.mde_paired(10, 0.03, ALPHA, 1)
    assert st.mde_paired(1, 0.03) == math.inf and st.mde_paired(5, float("nan")) == math.inf
    assert st.mde_paired(5, 0.0) == 0.0
    assert st.mde_paired(np.int64(5), 0.03, ALPHA, np.int64(4)) == st.mde_paired(5, 0.03, ALPHA, 4)
    with pytest.raises(ValueError, match="power: got 1.5"):
        st.mde_paired(5, 1.0, power=1.5)
    with pytest.raises(ValueError, match="n_comparisons: got 0"):
        st.mde_paired(5, 1.0, n_comparisons=0)


def test_mde_sentence():
    assert st.mde_sentence(2, 0.4123, "val_loss", 0.05, 4) == (
        "with n=2 seeds, differences in val_loss under 0.412 cannot be detected (80% power, α=0.05 Holm over 4 arms)")
    assert st.mde_sentence(1, math.inf, "val_loss", 0.05, 1) == (
        "with n=1 seed, no difference in val_loss can be detected (no variance estimate; 80% power, α=0.05)")


# ---------------------------------------------------------------- runs, pairs, verdicts


def _rows(spec: list[tuple[str, int, float, str]]) -> pd.DataFrame:
    return pd.DataFrame(spec, columns=["arm", "seed", "value", "status"])


def test_count_runs_and_bad_input():
    rows = _rows([("static", 0, 1.5, "finished"), ("static", 1, 1.6, "incomplete"),
                  ("ewma", 0, np.inf, "diverged"), ("ewma", 1, 1.4, "finished")])
    c = st.count_runs(rows)
    assert c.loc["static"].tolist() == [2, 1, 0, 1] and c.loc["ewma"].tolist() == [2, 1, 1, 0]
    with pytest.raises(ValueError, match="status: got 'killed', expected one of"):
        st.count_runs(_rows([("static", 0, 1.5, "killed")]))
    with pytest.raises(ValueError, match="arm 'static' seed 0 appears twice"):
        st.count_runs(_rows([("static", 0, 1.5, "finished"), ("static", 0, 1.5, "finished")]))
    with pytest.raises(ValueError, match="value: got nan for finished arm 'ewma' seed 2"):
        st.count_runs(_rows([("ewma", 2, np.nan, "finished")]))


def test_pairing_never_drops_a_seed():
    rows = _rows([
        ("static", 0, 1.50, "finished"), ("static", 1, 1.52, "finished"), ("static", 2, 9.0, "diverged"),
        ("static", 3, 1.55, "finished"), ("static", 4, 1.51, "finished"),
        ("ewma", 0, 1.45, "finished"), ("ewma", 1, 1.47, "diverged"), ("ewma", 2, 1.44, "finished"),
        ("ewma", 3, 1.40, "incomplete"), ("ewma", 5, 1.43, "finished"),  # seed 4 absent, 5 only here
    ])
    pairs = st.pair_with_baseline(rows, "static")
    assert pairs["seed"].tolist() == [0, 1, 2, 3, 4, 5]
    assert pairs["category"].tolist() == ["paired", "lost", "won", "missing", "missing", "missing"]
    assert pairs["status"].tolist() == ["finished", "diverged", "finished", "incomplete", "absent", "finished"]
    assert pairs.loc[1, "value"] == np.inf and pairs.loc[2, "baseline_value"] == np.inf
    assert pairs.loc[0, "diff"] == pytest.approx(-0.05) and pairs["diff"].iloc[1:].isna().all()
    both = st.pair_with_baseline(_rows([("static", 0, 1.0, "diverged"), ("a", 0, 1.0, "diverged")]), "static")
    assert both["category"].tolist() == ["both_diverged"]
    with pytest.raises(ValueError, match="baseline: got 'nope'"):
        st.pair_with_baseline(rows, "nope")


def test_compare_with_baseline_counts_holm_and_divergence_veto():
    seeds = range(6)
    base = [1.50, 1.52, 1.48, 1.55, 1.51, 1.49]
    spec = [("static", s, base[s], "finished") for s in seeds]
    spec += [("fast", s, base[s] - 0.05 + 0.002 * (s % 2), "finished") for s in seeds]  # clearly better
    spec += [("slow", s, base[s] + 0.05 + 0.002 * (s % 3), "finished") for s in seeds]  # clearly worse
    spec += [("risky", s, base[s] - 0.05 + 0.001 * s, "finished") for s in seeds[1:]]
    spec += [("risky", 0, np.inf, "diverged")]  # better on every finished seed, but lost seed 0
    table, sentence = st.compare_with_baseline(_rows(spec), "static")
    assert table.index.tolist() == ["static", "fast", "risky", "slow"]
    assert table["verdict"].tolist() == ["baseline", "better", "no clear difference", "worse"]
    assert table.loc["risky", ["n_paired", "n_lost", "n_diverged"]].tolist() == [5, 1, 1]
    assert table.loc["risky", "p_holm"] < ALPHA  # the test alone would have said "better"
    # Holm: the adjusted p-values are those of st.holm over the three arms.
    np.testing.assert_allclose(table.loc[["fast", "risky", "slow"], "p_holm"],
                               st.holm(table.loc[["fast", "risky", "slow"], "p"].to_numpy())[1])
    assert table.loc["risky", "n"] == 5 and table.loc["static", "n"] == 6
    assert table.loc["fast", "mean"] == pytest.approx(np.mean([base[s] - 0.05 + 0.002 * (s % 2) for s in seeds]))
    assert table.loc["fast", "iqm_low"] <= table.loc["fast", "iqm"] <= table.loc["fast", "iqm_high"]
    fast = table.loc["fast"]
    assert fast["delta_boot_low"] <= fast["delta"] <= fast["delta_boot_high"] < 0
    pd.testing.assert_frame_equal(table, st.compare_with_baseline(_rows(spec), "static")[0])  # seeded bootstrap
    assert sentence.startswith("with n=5 seeds, differences in val_loss under ")
    assert sentence.endswith("(80% power, α=0.05 Holm over 3 arms)")


def test_compare_with_baseline_edge_cases():
    alone = _rows([("static", 0, 1.5, "finished"), ("static", 1, 1.6, "finished")])
    table, sentence = st.compare_with_baseline(alone, "static")
    assert table["verdict"].tolist() == ["baseline"] and sentence == "no arm to compare with the baseline 'static'"
    nothing = pd.concat([alone, _rows([("a", 0, 1.0, "incomplete"), ("a", 1, np.inf, "diverged")])])
    table, sentence = st.compare_with_baseline(nothing, "static")
    assert table.loc["a", ["n_runs", "n_paired", "n_missing", "n_lost"]].tolist() == [2, 0, 1, 1]
    assert table.loc["a", "verdict"] == "no verdict: none of 2 runs finished (1 failed, 1 diverged)"
    assert table.loc["a", "mde"] == math.inf and math.isnan(table.loc["a", "p_holm"])
    assert sentence.startswith("with n=0 seeds, no difference in val_loss can be detected")


def test_an_arm_with_no_finished_run_has_no_verdict_and_keeps_the_others():
    base = [1.50, 1.52, 1.48, 1.55, 1.51]
    spec = [("static", s, base[s], "finished") for s in range(5)]
    spec += [("fast", s, base[s] - 0.05 + 0.002 * (s % 2), "finished") for s in range(5)]
    spec += [("dead", s, np.nan, "incomplete") for s in range(5)]
    spec += [("gone", s, np.inf, "diverged") for s in range(2)]
    table, sentence = st.compare_with_baseline(_rows(spec), "static")
    assert table.loc["dead", "verdict"] == "no verdict: all 5 runs failed"
    assert table.loc["gone", "verdict"] == "no verdict: all 2 runs diverged"
    assert table.loc["fast", "verdict"] == "better"
    assert table.loc["dead", "n_missing"] == 5 and np.isnan(table.loc["dead", "mean"])
    # the dead arms stay in the Holm family (m = 3) but not in the MDE's smallest n
    assert table.loc["fast", "p_holm"] == pytest.approx(min(1.0, 3 * table.loc["fast", "p"]))
    assert sentence.startswith("with n=5 seeds, differences in val_loss under ") and "Holm over 3 arms" in sentence
    # a baseline with no finished run: nothing can be judged against it
    dead_base = _rows([("static", 0, np.nan, "incomplete"), ("static", 1, np.nan, "incomplete"),
                       ("a", 0, 1.0, "finished"), ("a", 1, 1.1, "finished")])
    table, _ = st.compare_with_baseline(dead_base, "static")
    assert table["verdict"].tolist() == ["baseline", "no verdict: baseline 'static' has no finished run"]


def test_no_verdict_says_why():
    assert st.no_verdict(3, 1, 2) is None
    assert st.no_verdict(3, 0, 0) == "no verdict: all 3 runs failed"
    assert st.no_verdict(1, 0, 0) == "no verdict: its run failed"
    assert st.no_verdict(3, 0, 3) == "no verdict: all 3 runs diverged"
    assert st.no_verdict(3, 0, 1) == "no verdict: none of 3 runs finished (2 failed, 1 diverged)"
    assert st.no_verdict(0, 0, 0) == "no verdict: no run"


def test_compare_with_baseline_holm_withholds_a_marginal_uncorrected_win():
    # Four arms; one has p between alpha/4 and alpha: uncorrected it is "better", with Holm not.
    rng = np.random.default_rng(11)
    base = 1.5 + rng.normal(0, 0.05, 5)
    noise = np.array([0.01, -0.012, 0.008, -0.004, -0.002])
    spec = [("static", s, base[s], "finished") for s in range(5)]
    spec += [("a", s, base[s] - 0.012 + noise[s], "finished") for s in range(5)]
    for arm in ("b", "c", "d"):  # null arms
        spec += [(arm, s, base[s] + rng.normal(0, 0.02), "finished") for s in range(5)]
    table, _ = st.compare_with_baseline(_rows(spec), "static")
    p = table.loc["a", "p"]
    assert ALPHA / 4 < p < ALPHA, p
    assert _interval_verdict(table.loc["a", "delta"], table.loc["a", "ci95"]) == "better"
    assert table.loc["a", "verdict"] == "no clear difference"


# ---------------------------------------------------------------- compute to target


def _brute_pairs(window: int, seq_len: int, causal: bool) -> int:
    t = np.arange(seq_len)
    rel = t[:, None] - t[None, :]
    w = min(window, seq_len)
    return int((((rel >= 0) & (rel < w)) if causal else (np.abs(rel) < w)).sum())


def test_attention_cost_counts_the_band():
    for causal in (True, False):
        for seq_len in (1, 7, 16):
            for window in range(1, seq_len + 4):
                want = 1 * _brute_pairs(seq_len, seq_len, causal) + 3 * _brute_pairs(window, seq_len, causal)
                assert st.attention_cost(window, seq_len, 4, 1, causal) == want, (causal, seq_len, window)
    t = 256
    assert st.attention_cost(t, t, 1, 1, True) == t * (t + 1) / 2  # causal global: about half of T^2
    assert st.attention_cost(8, t, 2, 2, True) == st.attention_cost(t, t, 2, 0, True)  # all global
    # Local heads follow the window: doubling a small window about doubles their cost.
    assert st.attention_cost(32, t, 1, 0, True) / st.attention_cost(16, t, 1, 0, True) == pytest.approx(2, rel=0.05)
    np.testing.assert_array_equal(st.attention_cost(np.array([4, 8]), t, 4, 1, True),
                                  [st.attention_cost(4, t, 4, 1, True), st.attention_cost(8, t, 4, 1, True)])
    with pytest.raises(ValueError, match="n_global_heads: got 5, expected 0 .. n_heads=4"):
        st.attention_cost(8, t, 4, 5, True)
    with pytest.raises(ValueError, match="window: got 0"):
        st.attention_cost(0, t, 4, 1, True)


def _trace(windows: list[int], evals: dict[int, float], sec_per_step: float = 0.5) -> pd.DataFrame:
    steps = np.arange(1, len(windows) + 1)
    return pd.DataFrame({"step": steps, "window": windows, "val_loss": [evals.get(s, np.nan) for s in steps],
                         "train_seconds": steps * sec_per_step})


def test_run_to_target_sums_cost_up_to_the_first_hit():
    tr = _trace([4, 4, 8, 8, 16, 16], {2: 2.0, 4: 1.4, 6: 1.2})
    res = st.run_to_target(tr, 1.5, seq_len=32, n_heads=2, n_global_heads=1, causal=True)
    cost = lambda w: st.attention_cost(w, 32, 2, 1, True)  # noqa: E731
    assert res == st.ToTarget(True, 4.0, 2 * cost(4) + 2 * cost(8), 2.0)
    miss = st.run_to_target(tr, 1.0, 32, 2, 1)
    assert not miss.reached and miss.attention == math.inf and miss.seconds == math.inf
    # A gap in the window trace takes the last logged window.
    gappy = tr.drop(index=1).assign(val_loss=[np.nan, np.nan, 1.4, np.nan, np.nan])
    assert st.run_to_target(gappy, 1.5, 32, 2, 1).attention == res.attention
    with pytest.raises(ValueError, match="trace: missing column 'window'"):
        st.run_to_target(tr.drop(columns="window"), 1.5, 32, 2, 1)


def test_compute_to_target_per_arm_counts_not_reached():
    runs, long = [], []
    plans = {  # arm -> per seed (window, step at which val_loss first <= 1.5, or None)
        "static": [(16, 4), (16, 4), (16, 6)],
        "warm": [(4, 4), (4, 6), (4, None)],
        "small": [(8, 4), (8, 4), (8, 4)],
    }
    for arm, plan in plans.items():
        for seed, (window, hit) in enumerate(plan):
            rid = f"{arm}-{seed}"
            runs.append({"run_id": rid, "arm": arm, "seed": seed, "seq_len": 32, "n_heads": 2, "n_global_heads": 0})
            for s in range(1, 7):
                long += [(rid, s, "window", window), (rid, s, "train_seconds", float(s))]
                if s % 2 == 0:
                    long.append((rid, s, "val_loss", 1.4 if hit is not None and s >= hit else 1.8))
    traces = pd.DataFrame(long, columns=["run_id", "step", "key", "value"])
    per_run, per_arm = st.compute_to_target(pd.DataFrame(runs), traces, 1.5, baseline="static", n_boot=2000)
    assert len(per_run) == 9 and per_run["reached"].sum() == 8
    c = lambda w: st.attention_cost(w, 32, 2, 0, True)  # noqa: E731
    assert per_arm.loc["static", "attention_mean"] == pytest.approx((4 + 4 + 6) * c(16) / 3)
    assert per_arm.loc["small", "attention_rel"] == pytest.approx(4 * c(8) / ((4 + 4 + 6) * c(16) / 3))
    assert per_arm.loc["small", "attention_rel_high"] < 1  # "reaches the target with less compute"
    assert per_arm.loc["small", "seconds_mean"] == 4.0 and per_arm.loc["static", "seconds_rel"] == 1.0
    assert per_arm.loc["warm", ["n_runs", "n_reached"]].tolist() == [3, 2]
    assert per_arm.loc["warm", "attention_mean"] == math.inf and per_arm.loc["warm", "attention_high"] == math.inf
    assert np.isfinite(per_arm.loc["warm", "attention_low"])
    again = st.compute_to_target(pd.DataFrame(runs), traces, 1.5, baseline="static", n_boot=2000)[1]
    pd.testing.assert_frame_equal(per_arm, again)
    # a baseline that misses the target on a seed is no unit: no ratio, not even 0x for an arm
    # that reached it every time ("100% less compute" would be a false claim)
    per_arm = st.compute_to_target(pd.DataFrame(runs), traces, 1.5, baseline="warm", n_boot=200)[1]
    assert per_arm[["attention_rel", "seconds_rel"]].isna().all().all()


def test_baseline_target():
    assert st.baseline_target([1.5, 1.6, np.nan]) == 1.6
    assert st.baseline_target([1.5, 1.6], "mean") == pytest.approx(1.55)
    with pytest.raises(ValueError, match="how: got 'min'"):
        st.baseline_target([1.5], "min")


# ---------------------------------------------------------------- calibration


def _simulate(seed: int, effect_arm0: float = 0.0, noise: str = "normal", n_sims: int = N_SIMS,
              n_arms: int = 4, n: int = 5) -> tuple[np.ndarray, np.ndarray, float]:
    """Final val losses (n_sims, n_arms + 1, n) with arm 0 the baseline, and the sd of a diff.

    loss = 1.5 + seed effect (sd 0.05, shared by every arm of that seed) + run noise (sd 0.02).
    """
    rng = np.random.default_rng(seed)
    seed_effect = rng.normal(0.0, 0.05, size=(n_sims, 1, n))
    if noise == "normal":
        run = rng.normal(0.0, 0.02, size=(n_sims, n_arms + 1, n))
    else:  # heavy tails: Student t with 3 df, scaled to sd 0.02
        run = rng.standard_t(3, size=(n_sims, n_arms + 1, n)) * 0.02 / math.sqrt(3.0)
    loss = 1.5 + seed_effect + run
    loss[:, 1] += effect_arm0
    return loss, loss[:, 1:] - loss[:, :1], 0.02 * math.sqrt(2.0)


def _interval_verdict(delta: float, ci: float) -> str:
    """The uncorrected rule the report no longer uses: "better" when the 95% CI of the paired
    difference lies below 0, "worse" above. Kept here only to show the calibration can fail."""
    if not (np.isfinite(delta) and np.isfinite(ci)):
        return "no clear difference"
    return "better" if delta + ci < 0 else "worse" if delta - ci > 0 else "no clear difference"


def _fwer(verdicts: np.ndarray) -> float:
    return float((verdicts != "no clear difference").any(axis=1).mean())


MC_FWER_BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / N_SIMS)  # 0.0646


@pytest.mark.parametrize("noise", ["normal", "student_t3"])
def test_calibration_null_family_wise_error(noise):
    _, diffs, _ = _simulate(seed=2026, noise=noise)
    delta, _, _, p = st.paired_t(diffs)
    fwer = _fwer(st.holm_verdicts(delta, p, ALPHA))
    print(f"null FWER ({noise}, {N_SIMS} comparisons, 4 arms, n=5): {fwer:.4f}")
    assert fwer <= MC_FWER_BOUND


def test_calibration_uncorrected_verdicts_would_fail():
    """The FWER test can fail: an uncorrected per-arm interval verdict exceeds the bound."""
    _, diffs, _ = _simulate(seed=2026)
    delta, half, _, _ = st.paired_t(diffs)
    uncorrected = np.vectorize(_interval_verdict)(delta, half)
    fwer = _fwer(uncorrected)
    print(f"null FWER without Holm: {fwer:.4f}")
    assert fwer > MC_FWER_BOUND


def test_calibration_table_path_equals_vectorized_path():
    """compare_with_baseline (what the tool prints) gives the verdicts that were calibrated."""
    loss, diffs, _ = _simulate(seed=7, effect_arm0=-0.04, n_sims=20)
    delta, _, _, p = st.paired_t(diffs)
    fast = st.holm_verdicts(delta, p, ALPHA)
    arms = ["static", "a", "b", "c", "d"]
    for i in range(20):
        rows = _rows([(arms[k], s, loss[i, k, s], "finished") for k in range(5) for s in range(5)])
        table, _ = st.compare_with_baseline(rows, "static", n_boot=200)
        assert table.loc[arms[1:], "verdict"].tolist() == fast[i].tolist()
    assert (fast[:, 0] == "better").any()  # the comparison is not vacuous


def test_calibration_power_at_the_printed_mde():
    n, m = 5, 4
    mde = st.mde_paired(n, 0.02 * math.sqrt(2.0), ALPHA, m, 0.8)
    _, diffs, sd = _simulate(seed=99, effect_arm0=-mde)
    delta, _, _, p = st.paired_t(diffs)
    verdicts = st.holm_verdicts(delta, p, ALPHA)
    power = float((verdicts[:, 0] == "better").mean())
    tol = 3 * math.sqrt(0.8 * 0.2 / N_SIMS)  # 0.027
    print(f"MDE={mde:.4f} (sd of a paired difference {sd:.4f}); power of arm 0 under Holm: {power:.4f}")
    assert abs(power - 0.8) <= tol
    # The three null arms still keep their family-wise error.
    assert float((verdicts[:, 1:] != "no clear difference").any(axis=1).mean()) <= MC_FWER_BOUND


def test_modules_import_no_mlflow_ray_or_torch():
    """Each statistics module, imported without the report package around it (whose
    ``__init__`` reads MLflow), pulls in none of mlflow, ray, torch."""
    import subprocess

    pkg = Path(st.__file__).parent
    code = (
        "import sys, types, importlib\n"
        "for name, path in (('metalearner', []), ('metalearner.report', []),\n"
        f"                   ('metalearner.report.stats', [{str(pkg)!r}])):\n"
        "    m = types.ModuleType(name); m.__path__ = path; sys.modules[name] = m\n"
        "for mod in ('intervals', 'pairing', 'power', 'verdicts', 'to_target'):\n"
        "    importlib.import_module('metalearner.report.stats.' + mod)\n"
        "print(sorted(k for k in ('mlflow', 'ray', 'torch', 'metalearner.tracking') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert sorted(p.stem for p in pkg.glob("*.py")) == ["__init__", "intervals", "pairing", "power", "to_target",
                                                        "verdicts"]


def test_no_private_name_crosses_a_module_of_the_report():
    import ast

    root = Path(st.__file__).parents[1]
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.relative_to(root)} imports {private} from {node.module}"
