"""``compare``: the whole comparison of trainers (and their seeds) on the validation cases of one or more
datasets, written into an output folder.

Reads, for each dataset, trainer (seed) and fold, ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/
fold_<f>/validation/<case><file_ending>`` and the ground truth
``$nnUNet_preprocessed/<dataset>/gt_segmentations/<case><file_ending>``, computes per-case Dice, NSD and HD95,
pairs cases across trainers and writes ``per_case_metrics.csv``, ``ranking.csv``, ``report.md`` (per dataset:
paired statistics against the first trainer; then the rankings across datasets), ``paired_differences.png`` and
``training_curves.png``. The outputs are written to a temporary sibling folder and moved into the output folder
only when all of them are complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from nnunetv2_llm.common.outputs import staged_outputs
from nnunetv2_llm.common.trainer_names import seed_runs
from nnunetv2_llm.evaluation.compare.cases import case_tasks, per_case_table
from nnunetv2_llm.evaluation.compare.checks import REPORT_FILES, check_comparable, check_output_dir, check_runs
from nnunetv2_llm.evaluation.compare.compute import TrainingTime, training_time
from nnunetv2_llm.evaluation.compare.curves import Curves, epochs_trained, training_curves
from nnunetv2_llm.evaluation.compare.discover import Discovery, discover, trained_with
from nnunetv2_llm.evaluation.compare.figures import plot_curves, plot_differences
from nnunetv2_llm.evaluation.compare.report import report_markdown
from nnunetv2_llm.evaluation.compare.tables import (
    PairedTest,
    means_per_trainer,
    paired_differences,
    paired_tests,
    seed_means,
    seed_spread,
)

if TYPE_CHECKING:
    from nnunetv2_llm.model.spec import BottleneckSpec


@dataclass(frozen=True)
class DatasetResult:
    """What one dataset contributes to the report (numbers only).

    discovery: what ``discover`` found (its trainers are the model folders: seed variants where seeds are given).
    trainers/seeds: as given. table: its per-case rows. averaged: paired rows averaged over seeds.
    diffs/means/tests: ``tables``' paired differences, means and tests on ``averaged``.
    spread: ``tables.seed_spread`` (None without seeds). curves/epochs/settings/compute: per model folder (and
    fold).
    """

    discovery: Discovery
    trainers: list[str]
    seeds: list[int] | None
    table: pd.DataFrame
    averaged: pd.DataFrame
    diffs: pd.DataFrame
    means: dict[tuple[int, str, str], tuple[float, float]]
    tests: list[PairedTest]
    spread: pd.DataFrame | None
    curves: Curves
    epochs: dict[tuple[str, int], int | None]
    settings: dict[str, BottleneckSpec | str | None]
    compute: dict[tuple[str, int], TrainingTime]


def compare(
    datasets: Sequence[str | int] | str | int,
    configuration: str,
    trainers: Sequence[str],
    folds: Sequence[int],
    output_dir: Path,
    plans: str = "nnUNetPlans",
    seeds: Sequence[int] | None = None,
    nsd_tolerance_mm: float | Mapping[int, float] | None = None,
    nsd_method: str = "surface",
    results_root: Path | None = None,
    preprocessed_root: Path | None = None,
    workers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Compare trainers on the validation cases of ``folds`` of every dataset; the first trainer is the reference.

    Args:
        datasets: dataset ids or names (one id or name: a single dataset).
        configuration, trainers, folds, plans, seeds, nsd_tolerance_mm, nsd_method, results_root,
            preprocessed_root, workers: as ``write_comparison``.
        output_dir: must be empty or new unless ``overwrite`` (which replaces the report's files in it); the
            outputs appear there only when all are written.
        overwrite: see ``output_dir``.

    Returns:
        The path of ``report.md``.

    Raises:
        CompareError: as ``write_comparison``, or bad trainers, folds, datasets, seeds, NSD method or output folder
            (before anything is read).
    """
    datasets = [datasets] if isinstance(datasets, (str, int)) else list(datasets)
    check_comparable(trainers, folds)
    check_runs(datasets, seeds, nsd_method)
    check_output_dir(output_dir, overwrite)
    with staged_outputs(output_dir, REPORT_FILES) as staging:
        write_comparison(datasets, configuration, trainers, folds, staging, plans, nsd_tolerance_mm, results_root,
                         preprocessed_root, workers, seeds=seeds, nsd_method=nsd_method)
    return Path(output_dir) / "report.md"


def write_comparison(
    datasets: Sequence[str | int] | str | int,
    configuration: str,
    trainers: Sequence[str],
    folds: Sequence[int],
    folder: Path,
    plans: str = "nnUNetPlans",
    nsd_tolerance_mm: float | Mapping[int, float] | None = None,
    results_root: Path | None = None,
    preprocessed_root: Path | None = None,
    workers: int = 2,
    seeds: Sequence[int] | None = None,
    nsd_method: str = "surface",
) -> Path:
    """Write the comparison's files into ``folder`` (no output checks: ``compare`` does them and stages the folder).

    Args:
        datasets: dataset ids or names, or one of them.
        configuration: nnU-Net configuration, e.g. 3d_fullres.
        trainers: as ``checks.check_comparable`` accepts them; the first is the reference.
        folds: the folds to read.
        folder: where the files go.
        plans: the plans identifier.
        nsd_tolerance_mm: one value or ``{label value: mm}`` (None: ``DEFAULT_NSD_TOLERANCE_MM``, also for labels
            missing from the mapping).
        results_root/preprocessed_root: default to nnU-Net's ``nnUNet_results``/``nnUNet_preprocessed``.
        workers: > 1 evaluates cases in a spawned process pool; each worker first imports torch/MONAI (several
            seconds), so it pays off only for many or large cases.
        seeds: with seeds, trainer T with seed K is the model folder of ``seeded_name(T, K)``; each case's metrics
            are averaged over the seeds before the paired tests and rankings.
        nsd_method: ``"surface"`` (Nikolov et al.) or ``"boundary"`` (``metrics.surface_dice``).

    Returns:
        The path of ``report.md``.

    Raises:
        CompareError: a trainer/fold has no validation output (naming the command to run), a prediction is of a
            case outside the fold's split, or a file cannot be read.
    """
    from nnunetv2_llm.evaluation.metrics.per_case import DEFAULT_NSD_TOLERANCE_MM
    from nnunetv2_llm.evaluation.ranking import ranking_table

    datasets = [datasets] if isinstance(datasets, (str, int)) else list(datasets)
    tolerance = DEFAULT_NSD_TOLERANCE_MM if nsd_tolerance_mm is None else nsd_tolerance_mm
    runs = seed_runs(trainers, seeds)
    results = [_evaluate_dataset(d, configuration, list(trainers), list(folds), plans, tolerance, nsd_method, runs,
                                 seeds, (results_root, preprocessed_root), workers) for d in datasets]
    folder = Path(folder)
    pd.concat([r.table for r in results], ignore_index=True).to_csv(folder / "per_case_metrics.csv", index=False)
    ranking = ranking_table(pd.concat([r.averaged for r in results], ignore_index=True), trainers)
    ranking.to_csv(folder / "ranking.csv", index=False)
    plot_differences({r.discovery.name: r.diffs for r in results}, trainers[0], folder / "paired_differences.png")
    plot_curves({r.discovery.name: r.curves for r in results}, list(runs), folds, folder / "training_curves.png")
    report = folder / "report.md"
    report.write_text(report_markdown(results, ranking, nsd_method))
    return report


def _evaluate_dataset(dataset: str | int, configuration: str, trainers: list[str], folds: list[int], plans: str,
                      tolerance: float | Mapping[int, float], nsd_method: str,
                      runs: Mapping[str, tuple[str, int | None]], seeds: Sequence[int] | None,
                      roots: tuple[Path | None, Path | None], workers: int) -> DatasetResult:
    """Discover, measure and tabulate one dataset (arguments as ``write_comparison``; ``runs``: ``{model folder
    trainer name: (trainer, seed)}``)."""
    found = discover(dataset, configuration, list(runs), folds, plans, tolerance, *roots)
    table = per_case_table(case_tasks(found, nsd_method), found, workers, runs)
    paired = table[table["paired"]]
    averaged = seed_means(paired)
    diffs = paired_differences(averaged, trainers)
    curves = {(m, f): training_curves(found.trainer_dirs[m] / f"fold_{f}") for m in runs for f in folds}
    return DatasetResult(
        found, trainers, None if seeds is None else list(seeds), table, averaged, diffs,
        means_per_trainer(averaged, trainers, found.labels), paired_tests(diffs, trainers, found.labels),
        seed_spread(paired, trainers) if seeds is not None else None, curves, epochs_trained(curves),
        {m: trained_with(found.trainer_dirs[m]) for m in runs},
        {(m, f): training_time(found.trainer_dirs[m] / f"fold_{f}") for m in runs for f in folds})
