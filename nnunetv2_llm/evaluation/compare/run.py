"""``compare``: the whole comparison of trainers on their validation cases, written into an output folder.

Reads, for each trainer and fold, ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/
fold_<f>/validation/<case><file_ending>`` and the ground truth
``$nnUNet_preprocessed/<dataset>/gt_segmentations/<case><file_ending>``, computes per-case Dice, NSD and HD95,
pairs cases across trainers and writes ``per_case_metrics.csv``, ``report.md`` (paired statistics against the
first trainer), ``paired_differences.png`` and ``training_curves.png``. The outputs are written to a temporary
sibling folder and moved into the output folder only when all of them are complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunetv2_llm.common.outputs import staged_outputs
from nnunetv2_llm.evaluation.compare.cases import case_tasks, per_case_table
from nnunetv2_llm.evaluation.compare.checks import REPORT_FILES, check_comparable, check_output_dir
from nnunetv2_llm.evaluation.compare.curves import epochs_trained, training_curves
from nnunetv2_llm.evaluation.compare.discover import discover, trained_with
from nnunetv2_llm.evaluation.compare.figures import plot_curves, plot_differences
from nnunetv2_llm.evaluation.compare.report import report_markdown
from nnunetv2_llm.evaluation.compare.tables import means_per_trainer, paired_differences, paired_tests


def compare(
    dataset: str | int,
    configuration: str,
    trainers: Sequence[str],
    folds: Sequence[int],
    output_dir: Path,
    plans: str = "nnUNetPlans",
    nsd_tolerance_mm: float | Mapping[int, float] | None = None,
    results_root: Path | None = None,
    preprocessed_root: Path | None = None,
    workers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Compare trainers on the validation cases of ``folds``; the first trainer is the reference.

    ``output_dir`` must be empty or new unless ``overwrite`` (which replaces the report's files in it); the
    outputs appear there only when all are written. See ``write_comparison`` for the other arguments.
    Returns the path of ``report.md``.
    """
    check_comparable(trainers, folds)
    check_output_dir(output_dir, overwrite)
    with staged_outputs(output_dir, REPORT_FILES) as staging:
        write_comparison(dataset, configuration, trainers, folds, staging, plans, nsd_tolerance_mm, results_root,
                         preprocessed_root, workers)
    return Path(output_dir) / "report.md"


def write_comparison(
    dataset: str | int,
    configuration: str,
    trainers: Sequence[str],
    folds: Sequence[int],
    folder: Path,
    plans: str = "nnUNetPlans",
    nsd_tolerance_mm: float | Mapping[int, float] | None = None,
    results_root: Path | None = None,
    preprocessed_root: Path | None = None,
    workers: int = 2,
) -> Path:
    """Write the comparison's files into ``folder`` (no output checks: ``compare`` does them and stages the
    folder); ``trainers`` and ``folds`` as ``checks.check_comparable`` accepts them.

    ``results_root``/``preprocessed_root`` default to nnU-Net's ``nnUNet_results``/``nnUNet_preprocessed``.
    ``nsd_tolerance_mm`` is one value or ``{label value: mm}`` (None: ``DEFAULT_NSD_TOLERANCE_MM``, also for
    labels missing from the mapping). ``workers`` > 1 evaluates cases in a spawned process pool; each worker
    first imports torch/MONAI (several seconds), so it pays off only for many or large cases.
    Returns the path of ``report.md``.
    Raises ``CompareError`` when a trainer/fold has no validation output (naming the command to run), a
    prediction is of a case outside the fold's split, or a file cannot be read.
    """
    from nnunetv2_llm.evaluation.metrics.per_case import DEFAULT_NSD_TOLERANCE_MM

    tolerance = DEFAULT_NSD_TOLERANCE_MM if nsd_tolerance_mm is None else nsd_tolerance_mm
    found = discover(dataset, configuration, trainers, folds, plans, tolerance, results_root, preprocessed_root)
    df = per_case_table(case_tasks(found), found, workers)
    curves = {(t, f): training_curves(found.trainer_dirs[t] / f"fold_{f}") for t in trainers for f in folds}

    folder = Path(folder)
    df.to_csv(folder / "per_case_metrics.csv", index=False)
    paired_df = df[df["paired"]]
    diffs = paired_differences(paired_df, trainers)
    plot_differences(diffs, trainers[0], folder / "paired_differences.png")
    plot_curves(curves, trainers, folds, folder / "training_curves.png")
    text = report_markdown(found, means_per_trainer(paired_df, trainers, found.labels),
                           paired_tests(diffs, trainers, found.labels), curves, epochs_trained(curves),
                           {t: trained_with(found.trainer_dirs[t]) for t in trainers})
    report = folder / "report.md"
    report.write_text(text)
    return report
