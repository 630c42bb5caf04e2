"""What a comparison refuses before it computes anything: trainers, folds, NSD tolerances and the output folder."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.outputs import OutputRule, check_output_folder

# Every file a comparison report consists of (sweep-layers adds dice_per_layer.png): --overwrite replaces these
# and removes the ones a new run does not write, so old and new outputs never mix.
REPORT_FILES = ("per_case_metrics.csv", "ranking.csv", "report.md", "paired_differences.png", "training_curves.png",
                "dice_per_layer.png")


class CompareError(LLMSettingError):
    """The comparison cannot run; the message names what is missing and how to produce it (the CLI prints it
    on one line and exits 2, as for any bad input)."""


def check_comparable(trainers: Sequence[str], folds: Sequence[int], trainer_setting: str = "-tr") -> None:
    """CompareError unless there are at least two distinct trainers (the first is the reference) and no fold is
    given twice; ``trainer_setting`` is the option the trainers came from (head-to-head and sweep-layers call
    this before any training)."""
    if len(trainers) < 2 or len(set(trainers)) != len(trainers):
        raise CompareError(f"give at least two distinct trainers (the first is the reference), got {list(trainers)}",
                           trainer_setting)
    repeated = sorted({f for f in folds if list(folds).count(f) > 1})
    if repeated:
        raise CompareError(f"fold(s) {', '.join(map(str, repeated))} given more than once; give each fold once", "-f")


def check_output_dir(output_dir: Path, overwrite: bool, keep: Sequence[str] = ()) -> None:
    """CompareError when ``output_dir`` cannot be a folder, or already holds entries (other than names matching
    the glob patterns ``keep``) and ``overwrite`` is False."""
    check_output_folder(output_dir, overwrite, OutputRule(
        what="the report", setting="-o", keep=tuple(keep), error=CompareError,
        refusal="output folder {folder} is not empty ({count} entries: {shown}); pass --overwrite to replace the "
                "report in it, or choose another -o", refusal_setting="-o / --overwrite"))


def check_tolerance(tolerance: float | Mapping[int, float], labels: Mapping[int, str]) -> None:
    """CompareError unless every NSD tolerance is a finite number of mm > 0, for foreground labels (``labels``:
    ``{value: name}`` from dataset.json) only."""
    given = tolerance if isinstance(tolerance, Mapping) else {None: tolerance}
    for label, mm in given.items():
        if label is not None and label not in labels:
            known = ", ".join(f"{v} {n}" for v, n in labels.items())
            raise CompareError(f"--nsd-tolerance-mm: label {label} is not a foreground label of dataset.json "
                               f"({known})")
        if not (isinstance(mm, (int, float)) and math.isfinite(mm) and mm > 0):
            where = "" if label is None else f" of label {label}"
            raise CompareError(f"--nsd-tolerance-mm: the tolerance{where} must be a finite number of mm > 0, got {mm}")


def check_runs(datasets: Sequence[str | int], seeds: Sequence[int] | None, nsd_method: str) -> None:
    """CompareError unless at least one dataset is given, none twice (as given: ``4`` and ``Dataset004_X`` are
    told apart only once resolved), the seeds pass ``trainer_names.check_seeds`` and the NSD method is known."""
    from nnunetv2_llm.common.trainer_names import check_seeds
    from nnunetv2_llm.evaluation.metrics.surface_dice import NSD_METHODS

    names = [str(d) for d in datasets]
    if not names or len(set(names)) != len(names):
        raise CompareError(f"give at least one dataset, each once, got {names}", "-d")
    check_seeds(seeds)
    if nsd_method not in NSD_METHODS:
        raise CompareError(f"--nsd-method: one of {', '.join(NSD_METHODS)}, got {nsd_method!r}", "--nsd-method")
