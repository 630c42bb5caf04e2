"""Paired statistics for comparing a candidate trainer with a reference trainer, case by case.

Differences are always ``candidate - reference`` on the same cases. Conventions:

* mean ± sd: sample standard deviation (``ddof=1``); sd is 0 for a single case.
* 95% CI of the mean paired difference: ``scipy.stats.bootstrap`` (BCa, 10 000 resamples, fixed
  seed, ``paired=True``). All differences equal: the CI is that value (the bootstrap distribution
  is a point); fewer than 2 cases: NaN (no interval can be estimated).
* 95% CI of a median of one sample (the benchmark's paired time ratios): percentile bootstrap (BCa is
  unstable for the median of a few values), same resamples and seed; fewer than 3 values: NaN.
* p-value: two-sided Wilcoxon signed-rank test, zero differences dropped (``zero_method="wilcox"``), the
  p-value's method chosen from the non-zero differences (``wilcoxon_test``): SciPy's default would switch to the
  normal approximation whenever zeros are present, anti-conservative with few non-zero differences (47 zeros and
  5 positives: 0.043 instead of the exact 0.0625), and HD95 differences are often exactly zero. All differences
  zero: p = 1.0 (no evidence of a difference). No cases: NaN.
* Holm step-down correction over a family of p-values (valid under any dependence between
  tests, e.g. correlated metrics); NaN p-values are left out of the family.
* better / worse / tied per case, direction per metric (Dice and NSD higher is better, HD95 lower
  is better); a case is tied when ``|difference| <= tie_tolerance`` (see ``METRICS``) so float
  noise and negligible changes are not counted as wins or losses.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Wilcoxon p-value methods by the number of non-zero differences: exact distribution up to EXACT_MAX_N (SciPy's own
# limit for "auto"); with tied |differences| (where the exact table does not apply) a sign-flip permutation test,
# which enumerates all 2**n sign patterns when 2**n <= PERMUTATION_RESAMPLES; beyond, the normal approximation.
EXACT_MAX_N = 50
PERMUTATION_RESAMPLES = 100_000
WILCOXON_METHODS = {
    "exact": "exact signed-rank distribution",
    "permutation": f"sign-flip permutation test (all sign patterns up to n = {PERMUTATION_RESAMPLES.bit_length() - 1}"
                   f", else {PERMUTATION_RESAMPLES} random ones, seed {BOOTSTRAP_SEED})",
    "normal": "normal approximation",
    "all zero": "every difference is zero: p = 1",
}


@dataclass(frozen=True)
class MetricSpec:
    """Direction and tie tolerance of a metric."""

    higher_is_better: bool
    tie_tolerance: float


# Dice/NSD: ties within 0.001 (0.1 percentage point); HD95: within 0.01 mm, far below any voxel size.
METRICS: dict[str, MetricSpec] = {
    "dice": MetricSpec(higher_is_better=True, tie_tolerance=1e-3),
    "nsd": MetricSpec(higher_is_better=True, tie_tolerance=1e-3),
    "hd95": MetricSpec(higher_is_better=False, tie_tolerance=1e-2),
}


@dataclass(frozen=True)
class PairedResult:
    """Paired comparison of one metric: ``candidate - reference`` over ``n`` cases."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    better: int
    worse: int
    tied: int
    p_method: str = "exact"  # a key of ``WILCOXON_METHODS``, or "none" (no cases)


@dataclass(frozen=True)
class WilcoxonResult:
    """A two-sided Wilcoxon signed-rank p-value and how it was computed (a key of ``WILCOXON_METHODS``)."""

    p_value: float
    method: str


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (``ddof=1``; 0 for one value, NaN for none) of a 1D sequence."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else 0.0)


def bootstrap_ci(
    candidate: Sequence[float],
    reference: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Paired bootstrap CI of ``mean(candidate - reference)``; both inputs of shape (n_cases,)."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    d = a - b
    if d.size < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    res = stats.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        rng=seed,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def median_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``median(values)``, values of shape (n,)."""
    x = np.asarray(values, dtype=float)
    if x.size < 3:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.median, vectorized=True, method="percentile", confidence_level=confidence,
                          n_resamples=n_resamples, rng=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilcoxon_test(differences: Sequence[float]) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of paired differences, zeros dropped, exact where it can be.

    Args:
        differences: ``candidate - reference``, shape (n_cases,).

    Returns:
        The p-value and its method: ``"exact"`` (n non-zero <= ``EXACT_MAX_N`` without tied absolute values),
        ``"permutation"`` (ties among them, n <= ``EXACT_MAX_N``), ``"normal"`` (larger n), ``"all zero"`` (p = 1);
        no differences: NaN and ``"none"``.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return WilcoxonResult(float("nan"), "none")
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return WilcoxonResult(1.0, "all zero")
    if nonzero.size > EXACT_MAX_N:
        return WilcoxonResult(float(stats.wilcoxon(nonzero, method="asymptotic").pvalue), "normal")
    if np.unique(np.abs(nonzero)).size == nonzero.size:
        return WilcoxonResult(float(stats.wilcoxon(nonzero, method="exact").pvalue), "exact")
    # Flipping signs keeps the midranks of |d|: permute the signed ranks, statistic W+ - W- (linear in W+).
    signed_ranks = np.sign(nonzero) * stats.rankdata(np.abs(nonzero))
    res = stats.permutation_test((signed_ranks,), lambda x, axis: np.sum(x, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=PERMUTATION_RESAMPLES, rng=BOOTSTRAP_SEED)
    return WilcoxonResult(float(res.pvalue), "permutation")


def wilcoxon_p(differences: Sequence[float]) -> float:
    """The p-value of ``wilcoxon_test``; differences of shape (n_cases,)."""
    return wilcoxon_test(differences).p_value


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, same order as the input; NaN entries stay NaN and are not counted.

    Sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) * p(j))`` with 1-based ranks.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def count_outcomes(differences: Sequence[float], spec: MetricSpec) -> tuple[int, int, int]:
    """Number of cases (better, worse, tied) for the candidate, given ``candidate - reference``; a non-finite
    difference is none of the three (so the counts then sum to less than the cases)."""
    d = np.asarray(differences, dtype=float)
    gain = d if spec.higher_is_better else -d
    better = int(np.sum(gain > spec.tie_tolerance))
    worse = int(np.sum(gain < -spec.tie_tolerance))
    return better, worse, int(np.sum(np.isfinite(d))) - better - worse


def paired_comparison(candidate: Sequence[float], reference: Sequence[float], metric: str) -> PairedResult:
    """All paired statistics of one metric; inputs aligned case by case, shape (n_cases,)."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired inputs must be 1D and aligned, got shapes {a.shape} and {b.shape}")
    d = a - b
    mean, sd = mean_sd(d)
    low, high = bootstrap_ci(a, b)
    better, worse, tied = count_outcomes(d, METRICS[metric])
    test = wilcoxon_test(d)
    return PairedResult(d.size, mean, sd, low, high, test.p_value, better, worse, tied, test.method)
