"""Rankings of trainers across tasks (a task is one class of one dataset), computed from per-case values.

Per task and metric (cases = validation cases of all folds, each trainer's value averaged over its seeds):

* aggregate-then-rank: rank the trainers' mean over cases;
* rank-then-aggregate: rank the trainers within each case, then rank their mean case rank;
* significance ranking (challengeR's): the number of other trainers a trainer is significantly better than,
  ranked; "significantly better": two-sided Wilcoxon signed-rank p (``statistics.wilcoxon_test``), Holm-corrected
  over the task's trainer pairs, below ``ALPHA``, in the direction of the signed-rank sum;
* bootstrap stability: the fraction of ``BOOTSTRAP_RESAMPLES`` resamples of the cases (with replacement, seed
  ``BOOTSTRAP_SEED``) in which a trainer keeps its aggregate-then-rank rank.

Across tasks (consensus): each scheme's rank of the trainers' mean rank over tasks; the bootstrap resamples every
task's cases at once. Ranks: 1 is best; tied values share the smallest rank (challengeR's default ``min``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from nnunetv2_llm.evaluation.statistics import METRICS, holm, wilcoxon_test

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONSENSUS = "all"  # the dataset and class of the consensus rows
RANKING_COLUMNS = ["metric", "dataset", "class", "trainer", "mean", "aggregate_then_rank", "mean_case_rank",
                   "rank_then_aggregate", "significant_wins", "significance_rank", "bootstrap_keeps_rank"]


def rank(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks along the last axis, 1 = best, ties sharing the smallest rank.

    Args:
        scores: shape ``(..., n_trainers)``.
        higher_is_better: direction of the scores.

    Returns:
        Integer ranks, same shape.
    """
    return stats.rankdata(-scores if higher_is_better else scores, method="min", axis=-1).astype(int)


def aggregate_then_rank(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank of each trainer's mean over cases.

    Args:
        values: shape ``(n_cases, n_trainers)``.
        higher_is_better: the metric's direction.

    Returns:
        Ranks, shape ``(n_trainers,)``.
    """
    return rank(values.mean(axis=0), higher_is_better)


def mean_case_rank(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Each trainer's mean rank over cases (rank-then-aggregate's score; lower is better).

    Args:
        values: shape ``(n_cases, n_trainers)``.
        higher_is_better: the metric's direction.

    Returns:
        Mean ranks, shape ``(n_trainers,)``.
    """
    return rank(values, higher_is_better).mean(axis=0)


def significant_wins(values: np.ndarray, higher_is_better: bool, alpha: float = ALPHA) -> np.ndarray:
    """How many other trainers each trainer is significantly better than (see the module).

    Args:
        values: shape ``(n_cases, n_trainers)``, cases paired across trainers.
        higher_is_better: the metric's direction.
        alpha: significance level after Holm's correction over the ``n(n-1)/2`` pairs.

    Returns:
        Counts, shape ``(n_trainers,)``.
    """
    pairs = list(combinations(range(values.shape[1]), 2))
    gains = [(values[:, a] - values[:, b]) * (1 if higher_is_better else -1) for a, b in pairs]
    p_holm = holm([wilcoxon_test(g).p_value for g in gains])
    wins = np.zeros(values.shape[1], dtype=int)
    for (a, b), gain, p in zip(pairs, gains, p_holm, strict=True):
        if p < alpha:
            nonzero = gain[gain != 0]
            signed_ranks = np.sign(nonzero) * stats.rankdata(np.abs(nonzero))
            wins[a if signed_ranks.sum() > 0 else b] += 1
    return wins


def bootstrap_ranks(values: np.ndarray, higher_is_better: bool, rng: np.random.Generator,
                    n_resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Aggregate-then-rank ranks on bootstrap resamples of the cases.

    Args:
        values: shape ``(n_cases, n_trainers)``.
        higher_is_better: the metric's direction.
        rng: the generator drawing the resamples.
        n_resamples: how many resamples.

    Returns:
        Ranks, shape ``(n_resamples, n_trainers)``.
    """
    index = rng.integers(0, values.shape[0], size=(n_resamples, values.shape[0]))
    return rank(values[index].mean(axis=1), higher_is_better)


def task_ranking(values: np.ndarray, higher_is_better: bool, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Every ranking of one task and its bootstrap ranks.

    Args:
        values: shape ``(n_cases, n_trainers)``.
        higher_is_better: the metric's direction.
        rng: the generator drawing the bootstrap resamples.

    Returns:
        ``{column of RANKING_COLUMNS: array of shape (n_trainers,)}`` and the bootstrap ranks, shape
        ``(BOOTSTRAP_RESAMPLES, n_trainers)``.
    """
    atr = aggregate_then_rank(values, higher_is_better)
    case_rank = mean_case_rank(values, higher_is_better)
    wins = significant_wins(values, higher_is_better)
    boot = bootstrap_ranks(values, higher_is_better, rng)
    return {"mean": values.mean(axis=0), "aggregate_then_rank": atr, "mean_case_rank": case_rank,
            "rank_then_aggregate": rank(case_rank, higher_is_better=False), "significant_wins": wins,
            "significance_rank": rank(wins, higher_is_better=True),
            "bootstrap_keeps_rank": (boot == atr).mean(axis=0)}, boot


def consensus(tasks: Sequence[dict], boots: Sequence[np.ndarray]) -> dict:
    """The consensus over tasks: each scheme's rank of the mean rank over tasks, total wins, and how often the
    aggregate-then-rank consensus is kept when every task's cases are resampled.

    Args:
        tasks: ``task_ranking``'s dicts, one per task, trainers in the same order.
        boots: their bootstrap ranks, each ``(BOOTSTRAP_RESAMPLES, n_trainers)``.

    Returns:
        ``{column of RANKING_COLUMNS: array of shape (n_trainers,)}`` (NaN for the per-task scores).
    """
    def mean_rank(key: str) -> np.ndarray:
        return np.mean([t[key] for t in tasks], axis=0)

    atr = rank(mean_rank("aggregate_then_rank"), higher_is_better=False)
    boot = rank(np.mean(boots, axis=0), higher_is_better=False)
    nan = np.full(atr.shape, np.nan)
    return {"mean": nan, "aggregate_then_rank": atr, "mean_case_rank": nan,
            "rank_then_aggregate": rank(mean_rank("rank_then_aggregate"), higher_is_better=False),
            "significant_wins": np.sum([t["significant_wins"] for t in tasks], axis=0),
            "significance_rank": rank(mean_rank("significance_rank"), higher_is_better=False),
            "bootstrap_keeps_rank": (boot == atr).mean(axis=0)}


def case_matrix(df: pd.DataFrame, metric: str, trainers: Sequence[str]) -> np.ndarray:
    """One task's values as ``(n_cases, n_trainers)``, cases present for every trainer.

    Args:
        df: rows ``trainer, fold, case`` and ``metric`` of one task, one row per trainer and case.
        metric: the column to take.
        trainers: the column order.

    Returns:
        The matrix.

    Raises:
        ValueError: no case is present for every trainer.
    """
    wide = df.pivot_table(index=["fold", "case"], columns="trainer", values=metric).reindex(columns=list(trainers))
    wide = wide.dropna()
    if wide.empty:
        raise ValueError("no case is present for every trainer")
    return wide.to_numpy(dtype=float)


def ranking_table(per_case: pd.DataFrame, trainers: Sequence[str]) -> pd.DataFrame:
    """Every ranking per metric, per task and over all tasks.

    Args:
        per_case: ``dataset, trainer, fold, case, label_name`` and the metric columns of ``statistics.METRICS``,
            one row per trainer, case and class (seeds already averaged).
        trainers: the trainers to rank.

    Returns:
        ``RANKING_COLUMNS``: per metric, one row per task and trainer, then the consensus rows (dataset and class
        ``CONSENSUS``).

    Raises:
        ValueError: a task has no case present for every trainer.
    """
    rows = []
    for metric, spec in METRICS.items():
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        tasks, boots = [], []
        for (dataset, name), task in per_case.groupby(["dataset", "label_name"], sort=False):
            ranking, boot = task_ranking(case_matrix(task, metric, trainers), spec.higher_is_better, rng)
            tasks.append(ranking)
            boots.append(boot)
            rows += _rows(metric, dataset, name, trainers, ranking)
        rows += _rows(metric, CONSENSUS, CONSENSUS, trainers, consensus(tasks, boots))
    return pd.DataFrame(rows, columns=RANKING_COLUMNS)


def _rows(metric: str, dataset: str, name: str, trainers: Sequence[str], ranking: dict) -> list[dict]:
    return [{"metric": metric, "dataset": dataset, "class": name, "trainer": t,
             **{key: ranking[key][i] for key in RANKING_COLUMNS[4:]}} for i, t in enumerate(trainers)]
