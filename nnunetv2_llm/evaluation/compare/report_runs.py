"""The report's sections about the whole protocol (markdown rendering only): rankings across datasets, the seed
spread of one dataset and the compute per trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from nnunetv2_llm.evaluation.compare.tables import METRIC_TITLES

if TYPE_CHECKING:
    from nnunetv2_llm.evaluation.compare.run import DatasetResult


def fmt(metric: str, x: float) -> str:
    """A metric value as the report shows it: HD95 with 2 decimals, Dice and NSD with 4, NaN as n/a."""
    return "n/a" if np.isnan(x) else (f"{x:.2f}" if metric == "hd95" else f"{x:.4f}")


def ranking_lines(ranking: pd.DataFrame, trainers: Sequence[str], n_datasets: int) -> list[str]:
    """"Ranking across datasets": per metric, the consensus ranks and each task's ranks (``ranking.ranking_table``).
    """
    from nnunetv2_llm.evaluation.ranking import ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONSENSUS

    tasks = ranking[(ranking["dataset"] != CONSENSUS)][["dataset", "class"]].drop_duplicates()
    lines = ["## Ranking across datasets", "",
             f"{len(tasks)} tasks (class x dataset) from {n_datasets} dataset(s); 1 is best, ties share the "
             "smallest rank. Per task: aggregate-then-rank (rank of the mean over cases), rank-then-aggregate (rank "
             "of the mean per-case rank), significance (challengeR: the number of trainers one is significantly "
             f"better than, two-sided Wilcoxon, Holm over the task's pairs, alpha {ALPHA:g}) and bootstrap stability "
             f"(share of {BOOTSTRAP_RESAMPLES} case resamples, seed {BOOTSTRAP_SEED}, that keep the "
             "aggregate-then-rank rank). Across tasks: the rank of each scheme's mean rank over tasks; the bootstrap "
             "resamples every task at once. All numbers are in `ranking.csv`.", ""]
    for metric, title in METRIC_TITLES.items():
        rows = ranking[ranking["metric"] == metric]
        consensus = rows[rows["dataset"] == CONSENSUS].set_index("trainer").loc[list(trainers)]
        lines += [f"### {title}", "",
                  "| Trainer | aggregate-then-rank | rank-then-aggregate | significance rank (wins) | "
                  "keeps its rank (bootstrap) |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {c.aggregate_then_rank} | {c.rank_then_aggregate} | {c.significance_rank} "
                  f"({c.significant_wins}) | {c.bootstrap_keeps_rank:.0%} |" for t, c in consensus.iterrows()]
        lines += ["", "Per task, aggregate-then-rank / rank-then-aggregate / significance rank:", "",
                  f"| Dataset | Class | {' | '.join(trainers)} |", "|---|---|" + "---|" * len(trainers)]
        for (dataset, name), task in rows[rows["dataset"] != CONSENSUS].groupby(["dataset", "class"], sort=False):
            task = task.set_index("trainer").loc[list(trainers)]
            cells = [f"{c.aggregate_then_rank} / {c.rank_then_aggregate} / {c.significance_rank}"
                     for _, c in task.iterrows()]
            lines.append(f"| {dataset} | {name} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def seed_spread_lines(spread: pd.DataFrame, trainers: Sequence[str], labels: Mapping[int, str]) -> list[str]:
    """The seed spread (``tables.seed_spread``) next to the difference to the reference."""
    lines = ["", "### Seed spread", "",
             "Per seed, the mean over folds of each fold's mean; then mean ± sd over seeds. A difference to the "
             "reference smaller than the seeds' sd is within run-to-run variation.", "",
             "| Class | Metric | Trainer | seeds | mean ± sd over seeds | Δ to reference |",
             "|---|---|---|---|---|---|"]
    for value, name in labels.items():
        for metric, title in METRIC_TITLES.items():
            rows = spread[(spread["label"] == value) & (spread["metric"] == metric)].set_index("trainer")
            for t in trainers:
                r = rows.loc[t]
                diff = "-" if t == trainers[0] else fmt(metric, r["diff"])
                lines.append(f"| {name} | {title} | {t} | {r['seeds']} | {fmt(metric, r['mean'])} ± "
                             f"{fmt(metric, r['sd'])} | {diff} |")
    return lines


def compute_lines(results: Sequence[DatasetResult]) -> list[str]:
    """Training hours per dataset and trainer, summed over folds (and seeds), with the device and the sources."""
    from nnunetv2_llm.evaluation.compare.compute import __doc__ as how

    lines = ["## Compute", "", " ".join(how.split("\n\n")[1].split()).replace("``", "`"), "",
             "| Dataset | Trainer | device | training hours (sum) | folds timed | epochs | source |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        models = r.discovery.trainers
        for t in r.trainers:
            times = [time for (m, _), time in r.compute.items() if m in models and _base(m, r) == t]
            timed = [x for x in times if x.hours is not None]
            hours = f"{sum(x.hours for x in timed):.2f}" if timed else "?"
            devices = ", ".join(sorted({x.device for x in times})) or "?"
            sources = ", ".join(sorted({x.source for x in times}))
            lines.append(f"| {r.discovery.name} | {t} | {devices} | {hours} | {len(timed)} of {len(times)} | "
                         f"{sum(x.epochs for x in timed)} | {sources} |")
    return [*lines, ""]


def _base(model: str, r: DatasetResult) -> str:
    """The trainer a model folder's trainer name belongs to (its seed suffix removed when seeds are given)."""
    from nnunetv2_llm.common.trainer_names import split_seed

    return model if r.seeds is None else split_seed(model)[0]
