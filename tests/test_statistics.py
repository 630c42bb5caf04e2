"""Paired statistics against scipy and hand-computed values."""

import itertools

import numpy as np
import pytest
from scipy import stats

from nnunetv2_llm.evaluation.statistics import (
    METRICS,
    bootstrap_ci,
    count_outcomes,
    holm,
    mean_sd,
    median_ci,
    paired_comparison,
    wilcoxon_p,
    wilcoxon_test,
)

REFERENCE = np.array([0.80, 0.70, 0.90, 0.60, 0.75, 0.85, 0.65, 0.72])
CANDIDATE = np.array([0.82, 0.69, 0.95, 0.66, 0.75, 0.90, 0.70, 0.7205])


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, np.sqrt(5 / 3)))
    assert mean_sd([0.3]) == (0.3, 0.0)
    assert all(np.isnan(mean_sd([])))


def test_holm_hand_example():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 2*0.4=0.8, max(0.8, 0.5)
    assert holm([0.9, 0.01]) == pytest.approx([0.9, 0.02])
    out = holm([0.2, np.nan, 0.01])  # NaN is left out of the family (m = 2)
    assert out[[0, 2]] == pytest.approx([0.2, 0.02]) and np.isnan(out[1])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_wilcoxon_against_exact_values():
    # n = 6 after the zero is dropped, ranks 1..6, W- = 6: 14 of the 2**6 sign patterns have W- <= 6
    # ({}, {1}, {2}, {3}, {1,2}, {4}, {1,3}, {5}, {1,4}, {2,3}, {6}, {1,5}, {2,4}, {1,2,3}), two-sided p = 2 * 14 / 64.
    assert wilcoxon_p([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, -0.6]) == pytest.approx(28 / 64)
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(2 / 2**6)  # exact: all positive
    assert wilcoxon_p(np.zeros(5)) == 1.0
    assert np.isnan(wilcoxon_p([]))


def enumerated_signed_rank_p(differences) -> float:
    """Two-sided signed-rank p-value by enumerating every sign pattern of the non-zero differences (midranks for
    tied |d|): independent of SciPy's tables and permutation code."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    w = np.array([ranks[np.array(signs, bool)].sum() for signs in itertools.product([0, 1], repeat=d.size)])
    return min(1.0, 2 * min(np.mean(w >= observed - 1e-9), np.mean(w <= observed + 1e-9)))


def test_wilcoxon_with_many_zero_differences_is_exact():
    d = [0.0] * 47 + [0.5, 1.0, 1.5, 2.0, 2.5]  # HD95-like: most cases tied exactly
    result = wilcoxon_test(d)
    assert (result.p_value, result.method) == (pytest.approx(2 / 2**5), "exact")  # all 5 positive: 2 of 32
    assert stats.wilcoxon(d).pvalue == pytest.approx(0.0431, abs=1e-4)  # SciPy's default: normal approximation


@pytest.mark.parametrize("d", [
    [0.0, 0.0, 0.3, 0.3, 0.1, -0.2, 0.3, 0.5],  # tied |d| (and zeros): no exact table
    [-0.25] * 5,
    [0.1, -0.1, 0.2, 0.2, 0.2, 0.4, -0.4, 0.6, 0.7, 0.8, 0.9, 0.05],
])
def test_wilcoxon_with_tied_differences_is_an_enumerated_permutation_test(d):
    result = wilcoxon_test(d)
    assert result.method == "permutation"
    assert result.p_value == pytest.approx(enumerated_signed_rank_p(d))


def test_wilcoxon_exact_and_normal_against_independent_values():
    d = [0.0, 0.03, -0.11, 0.25, 0.4, -0.52, 0.6, 0.71, 0.8]
    assert wilcoxon_test(d).method == "exact"
    assert wilcoxon_test(d).p_value == pytest.approx(enumerated_signed_rank_p(d))
    large = np.random.default_rng(0).normal(0.1, 1.0, 80)  # more than 50 non-zero: the normal approximation
    z = (stats.rankdata(np.abs(large))[large > 0].sum() - 80 * 81 / 4) / np.sqrt(80 * 81 * 161 / 24)
    assert wilcoxon_test(np.r_[large, 0, 0]).method == "normal"
    assert wilcoxon_test(np.r_[large, 0, 0]).p_value == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert wilcoxon_test(np.zeros(4)).method == "all zero" and wilcoxon_test([]).method == "none"


def test_bootstrap_matches_scipy_and_is_reproducible():
    expected = stats.bootstrap((CANDIDATE - REFERENCE,), np.mean, n_resamples=10_000, rng=0).confidence_interval
    low, high = bootstrap_ci(CANDIDATE, REFERENCE)
    assert (low, high) == pytest.approx((expected.low, expected.high))
    assert low < np.mean(CANDIDATE - REFERENCE) < high
    assert bootstrap_ci(CANDIDATE, REFERENCE) == (low, high)
    assert bootstrap_ci([0.9, 0.8, 0.7], [0.8, 0.7, 0.6]) == pytest.approx((0.1, 0.1))  # constant difference
    assert all(np.isnan(bootstrap_ci([0.9], [0.8])))


def test_median_ci_brackets_the_median_within_the_sample():
    ratios = np.array([1.04, 1.01, 1.07, 0.98, 1.05, 1.03, 1.10, 1.02, 1.06, 1.00])
    low, high = median_ci(ratios)
    assert ratios.min() <= low < np.median(ratios) < high <= ratios.max()  # resampled medians stay in the sample
    assert median_ci(ratios) == (low, high)  # fixed seed
    spread = median_ci(1 + 3 * (ratios - 1))
    assert spread[1] - spread[0] > high - low  # noisier rounds, wider interval
    assert median_ci([1.02, 1.02, 1.02]) == (1.02, 1.02)
    assert all(np.isnan(median_ci([1.0, 1.1])))


def test_count_outcomes_direction_and_ties():
    d = [0.01, -0.02, 0.0005, -0.0009, 0.3]
    assert count_outcomes(d, METRICS["dice"]) == (2, 1, 2)
    assert count_outcomes(d, METRICS["hd95"]) == (1, 1, 3)  # lower is better; |d| <= 0.01 mm is a tie
    assert count_outcomes([-2.0, 1.0, 0.005], METRICS["hd95"]) == (1, 1, 1)
    assert count_outcomes([0.1, np.nan, -0.1, 0.0], METRICS["dice"]) == (1, 1, 1)  # NaN is not a tie


def test_paired_comparison():
    r = paired_comparison(CANDIDATE, REFERENCE, "dice")
    d = CANDIDATE - REFERENCE
    assert r.n == 8
    assert r.mean_diff == pytest.approx(d.mean())
    assert r.sd_diff == pytest.approx(d.std(ddof=1))
    assert r.p_value == pytest.approx(enumerated_signed_rank_p(d))  # a zero and tied |d|: enumerated exactly
    assert r.p_method == "permutation"
    assert (r.better, r.worse, r.tied) == (5, 1, 2)  # +0.0005 and 0 are ties
    with pytest.raises(ValueError):
        paired_comparison([1.0, 2.0], [1.0], "dice")
