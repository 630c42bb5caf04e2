"""The per-case metrics table: every prediction and its ground truth read with nnU-Net's reader for the dataset
(``determine_reader_writer_from_dataset_json``, as nnU-Net's own evaluation does, so the spacing comes from
wherever nnU-Net keeps it, e.g. the .json beside a .tif), measured per label, optionally in a process pool."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from nnunetv2_llm.common.nnunet_commands import nnunet_dataset_id
from nnunetv2_llm.evaluation.compare.checks import CompareError
from nnunetv2_llm.evaluation.compare.discover import Discovery, val_command

CSV_COLUMNS = [
    "dataset", "trainer", "seed", "fold", "case", "label", "label_name", "dice", "nsd", "hd95", "ref_empty",
    "pred_empty", "paired"
]


class Case(NamedTuple):
    """One prediction to evaluate (picklable, for the process pool)."""

    trainer: str
    fold: int
    case: str
    prediction: Path
    ground_truth: Path
    labels: list[int]
    ignore_label: int | None
    tolerance: float | Mapping[int, float]
    reader: type  # nnU-Net's BaseReaderWriter subclass for the dataset
    prediction_fix: str  # what regenerates the prediction
    ground_truth_fix: str
    nsd_method: str = "surface"  # see ``metrics.surface_dice``


def case_tasks(discovery: Discovery, nsd_method: str = "surface") -> list[Case]:
    """One ``Case`` per prediction, with its ground truth from ``gt_segmentations`` and nnU-Net's reader;
    ``nsd_method``: ``"surface"`` or ``"boundary"`` (``metrics.surface_dice``).

    Raises:
        CompareError: a ground truth file is missing, or no nnU-Net reader opens the first one.
    """
    preprocess = f"run nnUNetv2_plan_and_preprocess -d {nnunet_dataset_id(discovery.preprocessed.name)}"
    gt_paths = {(t, f, case): discovery.preprocessed / "gt_segmentations" / pred.name
                for (t, f), cases in discovery.predictions.items() for case, pred in cases.items()}
    for gt_path in gt_paths.values():
        if not gt_path.is_file():
            raise CompareError(f"ground truth {gt_path} is missing; {preprocess}")
    gt_fix = f"delete it and {preprocess} (which copies the ground truth from nnUNet_raw again)"
    reader = _reader(discovery.dataset_json, min(gt_paths.values()), gt_fix)
    d = discovery
    return [Case(t, f, case, d.predictions[(t, f)][case], gt_path, list(d.labels), d.ignore_label, d.tolerance,
                 reader, f"regenerate it: {val_command(d.command, f, t)}", gt_fix, nsd_method)
            for (t, f, case), gt_path in gt_paths.items()]


def per_case_table(tasks: list[Case], discovery: Discovery, workers: int,
                   runs: Mapping[str, tuple[str, int | None]] | None = None) -> pd.DataFrame:
    """The ``CSV_COLUMNS`` table, one row per case and label, in the model folders' order.

    Args:
        tasks: from ``case_tasks``.
        discovery: what ``discover`` found (its trainers are the model folders' trainer names).
        workers: > 1 evaluates the cases in a spawned process pool (each worker first imports torch and MONAI,
            several seconds).
        runs: ``{model folder trainer name: (trainer, seed)}`` for seed variants; None: each name is its own
            trainer without a seed.

    Returns:
        The table; ``trainer`` is the trainer without its seed suffix, ``seed`` the seed (empty without seeds).
    """
    df = pd.DataFrame([row for rows in _map(evaluate_case, tasks, workers) for row in rows])
    df["label_name"] = df["label"].map(discovery.labels)
    df["paired"] = [(f, c) in discovery.paired for f, c in zip(df["fold"], df["case"], strict=True)]
    df = df.sort_values(["trainer", "fold", "case", "label"], key=_trainer_order(discovery.trainers))
    runs = runs or {t: (t, None) for t in discovery.trainers}
    df["seed"] = pd.array([runs[t][1] for t in df["trainer"]], dtype="Int64")
    df["trainer"] = [runs[t][0] for t in df["trainer"]]
    df["dataset"] = discovery.name
    return df[CSV_COLUMNS]


def evaluate_case(task: Case) -> list[dict]:
    """Rows ``{trainer, fold, case, label, dice, nsd, hd95, ref_empty, pred_empty}`` of one prediction.

    Raises:
        CompareError: a file cannot be read, or the prediction's shape or spacing differs from its ground truth.
    """
    from nnunetv2_llm.evaluation.metrics.per_case import case_metrics

    pred, pred_spacing = _read_seg(task.reader, task.prediction, task.prediction_fix)
    ref, spacing = _read_seg(task.reader, task.ground_truth, task.ground_truth_fix)
    if pred.shape != ref.shape or not np.allclose(pred_spacing, spacing, rtol=1e-3):
        raise CompareError(
            f"{task.prediction} (shape {pred.shape}, spacing {pred_spacing}) does not match its ground truth "
            f"{task.ground_truth} (shape {ref.shape}, spacing {spacing})"
        )
    if task.ignore_label is not None:  # voxels marked 'ignore' in the reference do not count
        pred = np.where(ref == task.ignore_label, 0, pred)
    rows = case_metrics(pred, ref, spacing, task.labels, task.tolerance, task.nsd_method)
    return [{"trainer": task.trainer, "fold": task.fold, "case": task.case, **row} for row in rows]


def _reader(dataset_json: dict, example: Path, fix: str) -> type:
    """nnU-Net's reader class for the dataset, chosen as its planner does: by dataset.json (file_ending,
    overwrite_image_reader_writer) and the first class that can open ``example``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    try:
        with redirect_stderr(io.StringIO()):  # nnU-Net prints a traceback for each reader that fails
            return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)
    except RuntimeError:
        raise CompareError(f"{example} cannot be read (no nnU-Net reader for {dataset_json['file_ending']} files "
                           f"opens it); {fix}") from None


def _read_seg(reader: type, path: Path, fix: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label map and spacing, both in the axis order of nnU-Net's reader ((z, y, x) for SimpleITK; the channel
    axis dropped). CompareError naming the file and ``fix`` when it cannot be read."""
    from nnunetv2_llm.common.images import nifti_problem

    # SimpleITK reads a truncated .nii.gz without complaint (missing voxels become zeros): check NIfTI first.
    problem = nifti_problem(path) if path.name.endswith((".nii", ".nii.gz")) else None
    if problem is None:
        try:
            seg, properties = reader().read_seg(str(path))
        except Exception as e:  # whatever the reader raises (SimpleITK, tifffile, nibabel, a missing sidecar)
            problem = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if problem is not None:
        raise CompareError(f"{path} cannot be read ({problem}); {fix}")
    return seg[0], tuple(float(s) for s in properties["spacing"])


def _map(fn: Callable, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) < 2:
        return [fn(t) for t in tasks]
    with get_context("spawn").Pool(workers) as pool:  # spawn: fork is unsafe once torch has started threads
        return pool.map(fn, tasks)


def _trainer_order(trainers: Sequence[str]) -> Callable[[pd.Series], pd.Series]:
    rank = {t: i for i, t in enumerate(trainers)}
    return lambda col: col.map(rank) if col.name == "trainer" else col
