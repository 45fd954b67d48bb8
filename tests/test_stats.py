"""The study's confidence intervals against hand computations and known coverage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from xcoder_jax import stats


def test_t_ci_matches_the_textbook_formula():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    ci = stats.t_ci(v)
    half = sps.t.ppf(0.975, 3) * v.std(ddof=1) / 2.0
    assert ci["mean"] == pytest.approx(3.5)
    assert ci["lo"] == pytest.approx(3.5 - half) and ci["hi"] == pytest.approx(3.5 + half)
    assert ci["n"] == 4


def test_paired_ci_is_the_t_ci_of_the_differences():
    a, b = np.array([3.0, 5.0, 4.0, 9.0]), np.array([1.0, 4.0, 4.5, 6.0])
    p, d = stats.paired_ci(a, b), stats.t_ci(a - b)
    assert (p["mean"], p["lo"], p["hi"]) == pytest.approx((d["mean"], d["lo"], d["hi"]))
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_ci([1.0, 2.0], [1.0])


@pytest.mark.parametrize("values", [[], [2.0], [1.0, float("nan")]])
def test_uncomputable_intervals_are_null_with_a_reason(values):
    ci = stats.t_ci(values)
    assert ci["lo"] is None and ci["hi"] is None and ci["reason"]
    json.dumps(ci, allow_nan=False)  # strict JSON
    assert not stats.excludes_zero(ci) and stats.sign(ci) == 0


def test_welch_ci_matches_a_hand_computation():
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 1.5, 2.0, 2.5])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = sps.t.ppf(0.975, dof) * math.sqrt(va + vb)
    ci = stats.welch_ci(a, b)
    assert ci["mean"] == pytest.approx(4.0 - 1.75)
    assert ci["lo"] == pytest.approx(2.25 - half) and ci["hi"] == pytest.approx(2.25 + half)


def test_proportion_ci_is_wilson_shifted_by_the_baseline():
    ci = stats.proportion_ci(3, 20, baseline=0.05)
    # Wilson score interval of 3/20 at z = 1.96 (hand computation).
    z, p, n = sps.norm.ppf(0.975), 0.15, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert ci["mean"] == pytest.approx(0.10)
    assert ci["lo"] == pytest.approx(centre - half - 0.05)
    assert ci["hi"] == pytest.approx(centre + half - 0.05)
    assert stats.proportion_ci(0, 0)["lo"] is None


def test_cluster_bootstrap_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(30), 4)
    values = rng.normal(1.0, 1.0, 120)
    a = stats.cluster_bootstrap_ci(values, clusters, seed=3)
    b = stats.cluster_bootstrap_ci(values, clusters, seed=3)
    assert a == b
    assert a["lo"] < a["mean"] < a["hi"] and a["mean"] == pytest.approx(values.mean())
    assert stats.cluster_bootstrap_ci(values, np.zeros(120), seed=0)["lo"] is None


def test_cluster_bootstrap_widens_when_clusters_share_their_values():
    """Units copied within a cluster carry no more information than one unit per cluster:
    the cluster bootstrap must give (about) the interval of the 30 cluster values, not the
    4x narrower-looking one of 120 independent units."""
    rng = np.random.default_rng(1)
    per_cluster = rng.normal(0.0, 1.0, 30)
    clusters = np.repeat(np.arange(30), 4)
    copied = stats.cluster_bootstrap_ci(np.repeat(per_cluster, 4), clusters, seed=0)
    naive = stats.cluster_bootstrap_ci(np.repeat(per_cluster, 4), np.arange(120), seed=0)
    width = lambda ci: ci["hi"] - ci["lo"]
    assert width(copied) > 1.6 * width(naive)
    t = stats.t_ci(per_cluster)
    assert width(copied) == pytest.approx(width(t), rel=0.25)


def test_cluster_bootstrap_coverage_is_near_95_percent():
    rng = np.random.default_rng(2)
    clusters = np.repeat(np.arange(25), 3)
    hits = 0
    for trial in range(200):
        effect = rng.normal(0.0, 1.0, 25)  # true mean 0, cluster-level noise
        v = np.repeat(effect, 3) + rng.normal(0.0, 0.3, 75)
        ci = stats.cluster_bootstrap_ci(v, clusters, n_boot=500, seed=trial)
        hits += ci["lo"] <= 0.0 <= ci["hi"]
    assert 0.88 <= hits / 200 <= 0.99


def test_cluster_bootstrap_with_replicates_averages_them_and_counts_their_spread():
    clusters = np.repeat(np.arange(20), 2)
    base = np.linspace(-1, 1, 40)
    same = np.stack([base] * 10)  # replicates that agree
    spread = same + np.linspace(-3, 3, 10)[:, None]  # replicates that disagree
    a = stats.cluster_bootstrap_ci(same, clusters, seed=0)
    b = stats.cluster_bootstrap_ci(spread, clusters, seed=0)
    assert a["mean"] == pytest.approx(0.0, abs=1e-12) and b["mean"] == pytest.approx(0.0, abs=1e-12)
    assert b["hi"] - b["lo"] > 1.5 * (a["hi"] - a["lo"])


def test_format_ci_shows_the_interval_or_why_it_is_missing():
    assert stats.format_ci(_ci := stats.t_ci([1.0, 2.0, 3.0])) == (
        f"{_ci['mean']:+.2f} [{_ci['lo']:+.2f}, {_ci['hi']:+.2f}]"
    )
    assert stats.format_ci(stats.t_ci([2.0])) == "+2.00 (no CI: one value: no spread to estimate)"
    assert stats.format_ci(None) == "n/a (not measured)"
    assert stats.format_ci(stats.t_ci([]), "{:.1f}") == "n/a (no values)"


# --- Zero-width intervals --------------------------------------------------------------------


def test_a_zero_width_interval_is_never_decisive():
    point = {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 5, "method": "test"}
    assert not stats.excludes_zero(point) and stats.sign(point) == 0
    assert stats.se_from_ci(point) is None
    narrow = {"mean": 0.3, "lo": 0.29, "hi": 0.31, "n": 5, "method": "test"}
    assert stats.excludes_zero(narrow) and stats.sign(narrow) == 1


def test_welch_ci_of_two_constant_groups_has_no_interval():
    ci = stats.welch_ci([2.0, 2.0, 2.0], [1.0, 1.0])
    assert ci["mean"] == pytest.approx(1.0)
    assert ci["lo"] is None and ci["hi"] is None and "no spread" in ci["reason"]
    assert not stats.excludes_zero(ci) and stats.sign(ci) == 0
    json.dumps(ci, allow_nan=False)


# --- Across seeds: standard errors, random effects, Holm ----------------------------------


def test_se_from_ci_inverts_a_normal_interval():
    ci = {"mean": 1.0, "lo": 1.0 - 1.959963984540054 * 0.25, "hi": 1.0 + 1.959963984540054 * 0.25}
    assert stats.se_from_ci(ci) == pytest.approx(0.25)
    assert stats.se_from_ci(stats.t_ci([2.0])) is None  # no interval


def test_random_effects_matches_a_hand_computation():
    y, s = [1.0, 2.0, 6.0], [0.5, 1.0, 1.0]
    # Fixed-effect weights 4, 1, 1: fixed mean (4 + 2 + 6) / 6 = 2, Q = 4 * 1 + 0 + 16 = 20,
    # C = 6 - (16 + 1 + 1) / 6 = 3, tau^2 = (20 - 2 dof) / 3 = 6.
    w = [4.0, 1.0, 1.0]
    fixed = (4 * 1 + 1 * 2 + 1 * 6) / 6
    q = 4 * (1 - fixed) ** 2 + (2 - fixed) ** 2 + (6 - fixed) ** 2
    assert (fixed, q) == pytest.approx((2.0, 20.0))
    tau2 = (q - 2) / (sum(w) - sum(x * x for x in w) / sum(w))
    assert tau2 == pytest.approx(6.0)
    ws = [1 / (0.25 + 6), 1 / (1 + 6), 1 / (1 + 6)]
    mean = (ws[0] * 1 + ws[1] * 2 + ws[2] * 6) / sum(ws)
    hk = (ws[0] * (1 - mean) ** 2 + ws[1] * (2 - mean) ** 2 + ws[2] * (6 - mean) ** 2) / 2
    assert hk > 1  # the Hartung-Knapp spread is used as it is (above its floor)
    se = math.sqrt(hk / sum(ws))
    half = 4.302652729911275 * se  # t quantile, 2 dof, 97.5%
    ci = stats.random_effects(y, s)
    assert ci["mean"] == pytest.approx(mean) and ci["k"] == ci["n"] == 3 and ci["dof"] == 2
    assert ci["lo"] == pytest.approx(mean - half) and ci["hi"] == pytest.approx(mean + half)
    assert ci["tau2"] == pytest.approx(6.0) and ci["tau"] == pytest.approx(math.sqrt(6.0))
    assert ci["Q"] == pytest.approx(20.0) and ci["I2"] == pytest.approx(18 / 20)
    assert ci["p"] == pytest.approx(2 * sps.t.sf(mean / se, 2))
    assert set(ci) >= {"mean", "lo", "hi", "n", "method"}
    json.dumps(ci, allow_nan=False)


def test_random_effects_of_agreeing_seeds_has_no_tau_and_the_floored_variance():
    y, s = [1.0, 1.1, 0.9], [1.0, 1.0, 1.0]
    # Q = 0.02 < 2 dof: tau^2 = 0, weights 1: the plain mean; the Hartung-Knapp spread
    # (0.01) is below 1, so the variance is the DerSimonian-Laird one, 1 / 3.
    ci = stats.random_effects(y, s)
    assert ci["tau"] == 0.0 and ci["I2"] == 0.0 and ci["Q"] == pytest.approx(0.02)
    assert ci["mean"] == pytest.approx(1.0)
    half = 4.302652729911275 * math.sqrt(1 / 3)
    assert (ci["lo"], ci["hi"]) == pytest.approx((1.0 - half, 1.0 + half))
    assert ci["p"] == pytest.approx(2 * sps.t.sf(1.0 / math.sqrt(1 / 3), 2))


def test_random_effects_needs_two_replications_with_positive_errors():
    one = stats.random_effects([0.7], [0.1])
    assert one["mean"] == 0.7 and one["lo"] is None and one["p"] is None and one["k"] == 1
    assert stats.random_effects([], [])["reason"] == "no replications"
    assert stats.random_effects([1.0, 2.0], [0.1, 0.0])["lo"] is None
    with pytest.raises(ValueError, match="one standard error per effect"):
        stats.random_effects([1.0, 2.0], [0.1])


def test_holm_matches_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted: 0.005 <= 0.05/4 yes; 0.01 <= 0.05/3 yes; 0.03 <= 0.05/2 no: stop.
    assert stats.holm(p, 0.05) == [True, False, False, True]
    # Adjusted: 4 * 0.005, max(that, 3 * 0.01), max(.., 2 * 0.03), max(.., 1 * 0.04).
    assert stats.holm_adjusted(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm(p, 0.1) == [True, True, True, True]
    assert stats.holm([0.2, 0.001], 0.05) == [False, True]


def test_holm_counts_an_unmeasured_finding_in_the_family():
    # With the None counted, m = 2: 0.03 > 0.05 / 2. (Dropping it would reject at 0.05 / 1.)
    assert stats.holm([0.03, None]) == [False, False]
    assert stats.holm_adjusted([0.03, None]) == [pytest.approx(0.06), None]
    assert stats.holm([0.01, None, 0.005]) == [True, False, True]
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match="p-values"):
        stats.holm([1.5])


def test_difference_ci_combines_two_independent_intervals():
    z = 1.959963984540054
    a = {"mean": 2.0, "lo": 2.0 - 3 * z, "hi": 2.0 + 3 * z, "n": 10}  # SE 3
    b = {"mean": 0.5, "lo": 0.5 - 4 * z, "hi": 0.5 + 4 * z, "n": 8}  # SE 4
    d = stats.difference_ci(a, b)
    assert d["mean"] == pytest.approx(1.5) and d["n"] == 8
    assert d["hi"] - d["mean"] == pytest.approx(5 * z)  # SE sqrt(3^2 + 4^2) = 5
    assert d["mean"] - d["lo"] == pytest.approx(5 * z)
    # A zero-width side (every paired difference equal) adds no variance.
    exact = {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 10}
    d = stats.difference_ci(exact, b)
    assert d["mean"] == pytest.approx(0.5) and d["hi"] - d["mean"] == pytest.approx(4 * z)
    # Two zero-width sides, or a side without an interval: the mean, no interval, a reason.
    for other in (exact, {"mean": 1.0, "lo": None, "hi": None, "n": 3}):
        d = stats.difference_ci(exact, other)
        assert d["mean"] == pytest.approx(0.0) and d["lo"] is None and d["reason"]
    assert stats.difference_ci({"mean": None, "n": 0}, b)["mean"] is None
