"""The numbers of a comparison report: paired differences to the reference, means per trainer and the paired
tests with their Holm correction (``statistics``), computed from the per-case table of paired cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pandas as pd

from nnunetv2_llm.evaluation.statistics import METRICS, PairedResult, holm, mean_sd, paired_comparison

METRIC_TITLES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}  # the metrics of ``statistics.METRICS``


class PairedTest(NamedTuple):
    """One row of the paired-difference table: a candidate trainer, a class and a metric."""

    trainer: str
    label_name: str
    metric: str
    result: PairedResult
    holm_p: float


def paired_differences(paired_df: pd.DataFrame, trainers: Sequence[str]) -> pd.DataFrame:
    """Long table ``trainer, fold, case, label, label_name, metric, candidate, reference, diff`` of every candidate
    trainer against ``trainers[0]``; ``paired_df``: the per-case table's paired rows."""
    key = ["fold", "case", "label", "label_name"]
    melt = dict(value_vars=list(METRIC_TITLES), var_name="metric")
    ref = paired_df[paired_df["trainer"] == trainers[0]].melt(id_vars=key, value_name="reference", **melt)
    cand = paired_df[paired_df["trainer"] != trainers[0]]
    cand = cand.melt(id_vars=["trainer", *key], value_name="candidate", **melt)
    out = cand.merge(ref, on=[*key, "metric"], validate="many_to_one")
    out["diff"] = out["candidate"] - out["reference"]
    return out


def means_per_trainer(
    paired_df: pd.DataFrame, trainers: Sequence[str], labels: Mapping[int, str]
) -> dict[tuple[int, str, str], tuple[float, float]]:
    """``{(label value, metric, trainer): (mean, sd)}`` over the paired cases."""
    return {(value, metric, t): mean_sd(paired_df.loc[(paired_df["trainer"] == t) & (paired_df["label"] == value),
                                                      metric])
            for value in labels for metric in METRICS for t in trainers}


def paired_tests(diffs: pd.DataFrame, trainers: Sequence[str], labels: Mapping[int, str]) -> list[PairedTest]:
    """Every candidate x class x metric compared with the reference, Holm-corrected over the whole table."""
    results = []
    for t in trainers[1:]:
        for value, name in labels.items():
            for metric in METRICS:
                g = diffs[(diffs["trainer"] == t) & (diffs["label"] == value) & (diffs["metric"] == metric)]
                results.append((t, name, metric, paired_comparison(g["candidate"].to_numpy(),
                                                                   g["reference"].to_numpy(), metric)))
    p_holm = holm([r.p_value for *_, r in results])
    return [PairedTest(*row, float(p)) for row, p in zip(results, p_holm, strict=True)]


def seed_means(paired_df: pd.DataFrame) -> pd.DataFrame:
    """Each trainer's metrics per case averaged over its seeds: one row per ``dataset, trainer, fold, case,
    label`` (the unit of the paired tests and rankings; without seeds, the rows as they are)."""
    keys = ["dataset", "trainer", "fold", "case", "label", "label_name"]
    return paired_df.groupby(keys, sort=False, as_index=False)[list(METRIC_TITLES)].mean()


def seed_spread(paired_df: pd.DataFrame, trainers: Sequence[str]) -> pd.DataFrame:
    """Mean and sd over seeds of each trainer's fold means, next to its difference to the reference.

    Args:
        paired_df: the per-case table's paired rows of one dataset, with a ``seed`` per row.
        trainers: the trainers (without seed suffix); the first is the reference.

    Returns:
        ``label, label_name, metric, trainer, seeds, mean, sd, diff``: per seed, the mean over folds of the fold
        means over paired cases; ``mean``/``sd`` over seeds (sd ``ddof=1``, NaN for one seed); ``diff`` the
        trainer's ``mean`` minus the reference's.
    """
    per_seed = (paired_df.groupby(["trainer", "seed", "label", "label_name", "fold"], dropna=False)[list(METRIC_TITLES)]
                .mean().groupby(["trainer", "seed", "label", "label_name"], dropna=False).mean().reset_index()
                .melt(id_vars=["trainer", "seed", "label", "label_name"], var_name="metric"))
    out = (per_seed.groupby(["label", "label_name", "metric", "trainer"])["value"]
           .agg(seeds="count", mean="mean", sd="std").reset_index())
    reference = out[out["trainer"] == trainers[0]].set_index(["label", "metric"])["mean"]
    out["diff"] = out["mean"].to_numpy() - reference.loc[list(zip(out["label"], out["metric"], strict=True))].to_numpy()
    order = {t: i for i, t in enumerate(trainers)}
    return out.sort_values(["label", "metric", "trainer"], key=lambda c: c.map(order) if c.name == "trainer" else c,
                           ignore_index=True)
