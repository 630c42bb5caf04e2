"""Head-to-head comparison of nnU-Net v2 trainers on their cross-validation predictions.

Reads, for each trainer and fold, ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/
fold_<f>/validation/<case><file_ending>`` and the ground truth
``$nnUNet_preprocessed/<dataset>/gt_segmentations/<case><file_ending>``, computes per-case Dice,
NSD and HD95 (``metrics``), pairs cases across trainers and writes to ``output_dir``:
``per_case_metrics.csv``, ``report.md`` (paired statistics from ``statistics`` against the first
trainer), ``paired_differences.png`` and ``training_curves.png``.

Files are read with nnU-Net's reader for the dataset (``determine_reader_writer_from_dataset_json``, as
nnU-Net's own evaluation does), so spacing comes from wherever nnU-Net keeps it (e.g. the .json beside a
.tif). Each fold's expected validation cases are the ``val`` list of nnU-Net's ``splits_final.json``;
without that file they are the predictions found. The outputs are written to a temporary sibling folder
and moved into ``output_dir`` only when all of them are complete; an output folder that already holds
something is refused unless ``overwrite``.

Also the ``nnunetv2_llm compare`` sub-command (``add_arguments``/``main``); heavy imports (torch,
MONAI, nnU-Net, SimpleITK, scipy, seaborn) live inside functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from fnmatch import fnmatch
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import nnunet_dataset_id

CSV_COLUMNS = [
    "trainer", "fold", "case", "label", "label_name", "dice", "nsd", "hd95", "ref_empty", "pred_empty", "paired"
]
METRIC_TITLES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}  # the metrics of ``statistics.METRICS``
CURVES = {"train_loss": "train loss", "val_loss": "validation loss", "pseudo_dice": "pseudo Dice (mean foreground)"}
# Every file a comparison report consists of (sweep-layers adds dice_per_layer.png): --overwrite replaces these
# and removes the ones a new run does not write, so old and new outputs never mix.
REPORT_FILES = ("per_case_metrics.csv", "report.md", "paired_differences.png", "training_curves.png",
                "dice_per_layer.png")


class CompareError(LLMSettingError):
    """The comparison cannot run; the message names what is missing and how to produce it (the CLI prints it
    on one line and exits 2, as for any bad input)."""


class _Case(NamedTuple):
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
    from nnunetv2_llm.common.dataset_checks import file_in_the_way

    output_dir = Path(output_dir)
    blocking = file_in_the_way(output_dir)
    if blocking is not None:
        raise CompareError(f"cannot write the report to {output_dir}: {blocking} exists and is not a folder", "-o")
    held = sorted(p.name for p in output_dir.iterdir() if not any(fnmatch(p.name, k) for k in keep)) \
        if output_dir.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise CompareError(f"output folder {output_dir} is not empty ({len(held)} entries: {shown}); pass --overwrite "
                           "to replace the report in it, or choose another -o", "-o / --overwrite")


@contextmanager
def staged_outputs(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder to write the outputs to; when the block succeeds they are moved into
    ``output_dir`` (the report's files there are replaced, stale ones removed, other entries kept), when it fails
    ``output_dir`` is left as it was. The temporary folder is always removed."""
    output_dir = Path(output_dir).absolute()
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if not output_dir.exists():
            staging.rename(output_dir)  # one rename: all outputs or none
            return
        for name in REPORT_FILES:
            if (staging / name).exists():
                os.replace(staging / name, output_dir / name)
            else:
                (output_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    with staged_outputs(output_dir) as staging:
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
    folder); ``trainers`` and ``folds`` as ``check_comparable`` accepts them.

    ``results_root``/``preprocessed_root`` default to nnU-Net's ``nnUNet_results``/``nnUNet_preprocessed``.
    ``nsd_tolerance_mm`` is one value or ``{label value: mm}`` (None: ``metrics.DEFAULT_NSD_TOLERANCE_MM``,
    also for labels missing from the mapping). ``workers`` > 1 evaluates cases in a
    spawned process pool; each worker first imports torch/MONAI (several seconds), so it pays off
    only for many or large cases. Returns the path of ``report.md``.
    Raises ``CompareError`` when a trainer/fold has no validation output (naming the command to run), a
    prediction is of a case outside the fold's split, or a file cannot be read.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunetv2_llm.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM

    if nsd_tolerance_mm is None:
        nsd_tolerance_mm = DEFAULT_NSD_TOLERANCE_MM
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise CompareError(f"cannot resolve dataset {dataset!r}: {e}") from e
    results = _root(results_root, "nnUNet_results") / name
    preprocessed = _root(preprocessed_root, "nnUNet_preprocessed") / name
    trainer_dirs = {t: results / convert_trainer_plans_config_to_identifier(t, plans, configuration) for t in trainers}
    command = _command_prefix(name, configuration, plans)
    dataset_json = {"file_ending": ".nii.gz", **_dataset_json(trainer_dirs, preprocessed)}
    labels, ignore_label = _labels(dataset_json)
    _check_tolerance(nsd_tolerance_mm, labels)
    found = _validation_predictions(trainer_dirs, folds, command, dataset_json["file_ending"])
    expected, split_note = _expected_cases(preprocessed / "splits_final.json", found, folds)
    paired, excluded = _pair_cases(found, trainers, folds, expected)
    unfinished = [(t, f) for t in trainers for f in folds
                  if not (trainer_dirs[t] / f"fold_{f}" / "validation" / "summary.json").is_file()]

    tasks = _cases(found, preprocessed, dataset_json, command, labels, ignore_label, nsd_tolerance_mm)
    df = pd.DataFrame([row for rows in _map(_evaluate_case, tasks, workers) for row in rows])
    df["label_name"] = df["label"].map(labels)
    df["paired"] = [(f, c) in paired for f, c in zip(df["fold"], df["case"])]
    df = df.sort_values(["trainer", "fold", "case", "label"], key=_trainer_order(trainers))[CSV_COLUMNS]
    curves = {(t, f): training_curves(trainer_dirs[t] / f"fold_{f}") for t in trainers for f in folds}

    folder = Path(folder)
    df.to_csv(folder / "per_case_metrics.csv", index=False)
    diffs = _paired_differences(df[df["paired"]], trainers)
    _plot_differences(diffs, trainers[0], folder / "paired_differences.png")
    _plot_curves(curves, trainers, folds, folder / "training_curves.png")
    epochs = {key: None if found_curves is None else len(found_curves) for key, (found_curves, _) in curves.items()}
    sections = [
        *_budget_warning(trainers, folds, epochs),
        *_settings_lines(trainers, folds, trainer_dirs, epochs),
        *_validation_lines(excluded, unfinished, split_note, expected, command),
    ]
    report = folder / "report.md"
    header = dict(name=name, configuration=configuration, plans=plans, folds=folds, tolerance=nsd_tolerance_mm)
    report.write_text(_report(df[df["paired"]], diffs, trainers, labels, paired, curves, header, sections))
    return report


def training_curves(fold_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """Per-epoch ``epoch, train_loss, val_loss, pseudo_dice`` of one fold (None when nothing is readable) and
    where they came from.

    Source order: ``checkpoint_final.pth`` (key ``'logging'``), the ``training_log_*.txt`` files
    (a running training logs every epoch), ``checkpoint_latest.pth``. An unreadable checkpoint is skipped and
    named in the description.
    """
    from nnunetv2_llm.trainers.reliability import CheckpointUnreadable

    final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    sources = [(final.name, final.is_file(), lambda: _curves_from_checkpoint(final)),
               ("training_log_*.txt", bool(logs), lambda: _curves_from_logs(logs)),
               (latest.name, latest.is_file(), lambda: _curves_from_checkpoint(latest))]
    unreadable = []
    for name, present, read in sources:
        if not present:
            continue
        try:
            curves = read()
        except CheckpointUnreadable as e:
            unreadable.append(f"{name} unreadable: {e.reason}")
            continue
        return curves, name + (f" ({'; '.join(unreadable)})" if unreadable else "")
    if unreadable:
        return None, f"no readable checkpoint or training log ({'; '.join(unreadable)})"
    return None, "no checkpoint or training log found"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="trainer class names; the first is the reference, e.g. nnUNetTrainer nnUNetTrainerLLM")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--nsd-tolerance-mm", nargs="+", default=None, metavar="MM|LABEL=MM",
                        help="NSD tolerance: one value in mm for every class, or LABEL=MM per label value "
                             "(others 1.0); default 1.0")
    parser.add_argument("-o", "--output-dir", type=Path, default=None,
                        help="default: reports/compare_<dataset>_<configuration>; must be empty or new")
    parser.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty output folder")
    parser.add_argument("--workers", type=int, default=2, help="processes for the metric computation")


def main(args: argparse.Namespace) -> int:
    output_dir = args.output_dir or Path("reports") / f"compare_{args.dataset}_{args.configuration}"
    report = compare(args.dataset, args.configuration, args.trainers, args.folds, output_dir, args.plans,
                     _parse_tolerance(args.nsd_tolerance_mm), workers=args.workers, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def _parse_tolerance(values: Sequence[str] | None) -> float | dict[int, float] | None:
    if not values:
        return None
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [(int(label), float(mm)) for label, mm in (v.split("=") for v in values)]
    except ValueError:
        raise CompareError(f"--nsd-tolerance-mm: give one number or LABEL=MM pairs, got {' '.join(values)}") from None
    labels = [label for label, _ in pairs]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise CompareError(f"--nsd-tolerance-mm: label {repeated} is given twice; give each label once")
    return dict(pairs)


def _check_tolerance(tolerance: float | Mapping[int, float], labels: Mapping[int, str]) -> None:
    """Every tolerance a finite number of mm > 0, for foreground labels of dataset.json only."""
    given = tolerance if isinstance(tolerance, Mapping) else {None: tolerance}
    for label, mm in given.items():
        if label is not None and label not in labels:
            known = ", ".join(f"{v} {n}" for v, n in labels.items())
            raise CompareError(f"--nsd-tolerance-mm: label {label} is not a foreground label of dataset.json "
                               f"({known})")
        if not (isinstance(mm, (int, float)) and math.isfinite(mm) and mm > 0):
            where = "" if label is None else f" of label {label}"
            raise CompareError(f"--nsd-tolerance-mm: the tolerance{where} must be a finite number of mm > 0, got {mm}")


def _root(given: Path | None, env: str) -> Path:
    from nnunetv2 import paths as nnunet_paths

    if given is not None:
        return Path(given)
    try:
        return Path(os.fspath(getattr(nnunet_paths, env)))
    except (RuntimeError, TypeError) as e:
        raise CompareError(f"{env} is not set: export {env}=/path/to/{env} (see nnU-Net's setting_up_paths.md)") from e


def _command_prefix(dataset_name: str, configuration: str, plans: str) -> str:
    plans_arg = "" if plans == "nnUNetPlans" else f" -p {plans}"
    return f"nnUNetv2_train {nnunet_dataset_id(dataset_name)} {configuration} {{fold}} -tr {{trainer}}{plans_arg}"


def _val_command(command: str, fold: int, trainer: str) -> str:
    """The command that (re)writes a finished fold's validation output."""
    return command.format(fold=fold, trainer=trainer) + " --val"


def _dataset_json(trainer_dirs: Mapping[str, Path], preprocessed: Path) -> dict:
    from nnunetv2_llm.common.dataset_checks import load_dataset_json

    candidates = [d / "dataset.json" for d in trainer_dirs.values()] + [preprocessed / "dataset.json"]
    for path in candidates:
        if path.is_file():
            return load_dataset_json(path.parent)
    raise CompareError(f"no dataset.json found; looked at {', '.join(map(str, candidates))}")


def _labels(dataset_json: dict) -> tuple[dict[int, str], int | None]:
    """Foreground ``{value: name}`` and the ignore label value (or None) from dataset.json."""
    if not isinstance(dataset_json.get("labels"), dict):
        raise CompareError("dataset.json has no 'labels' mapping (nnU-Net's {name: value}); use the dataset's own "
                           "dataset.json from nnUNet_raw or nnUNet_preprocessed")
    raw = {name: value for name, value in dataset_json["labels"].items() if name != "background"}
    ignore = raw.pop("ignore", None)
    if any(not isinstance(v, int) for v in raw.values()):
        raise CompareError("region-based labels (lists in dataset.json 'labels') are not supported by compare")
    return {v: name for name, v in raw.items()}, ignore


def _validation_predictions(
    trainer_dirs: Mapping[str, Path], folds: Sequence[int], command: str, ending: str
) -> dict[tuple[str, int], dict[str, Path]]:
    """``{(trainer, fold): {case: prediction path}}``; CompareError listing every fold without predictions."""
    found, missing = {}, []
    for trainer, tdir in trainer_dirs.items():
        for fold in folds:
            fold_dir = tdir / f"fold_{fold}"
            preds = sorted((fold_dir / "validation").glob(f"*{ending}"))
            found[(trainer, fold)] = {p.name[: -len(ending)]: p for p in preds}
            if preds:
                continue
            cmd = command.format(fold=fold, trainer=trainer)
            if (fold_dir / "checkpoint_final.pth").is_file():
                why, cmd = "training finished (checkpoint_final.pth) but validation was not run", \
                    _val_command(command, fold, trainer)
            elif (fold_dir / "checkpoint_latest.pth").is_file():
                why, cmd = "training has not finished (only checkpoint_latest.pth)", cmd + " --c"
            else:
                why = "this fold has not been trained"
            missing.append(f"- {fold_dir / 'validation'}: no predictions; {why}. Run: {cmd}")
    if missing:
        raise CompareError("validation output missing:\n" + "\n".join(missing))
    return found


def _expected_cases(
    splits_file: Path, found: Mapping[tuple[str, int], Mapping[str, Path]], folds: Sequence[int]
) -> tuple[dict[int, set[str] | None], str]:
    """Each fold's validation cases from nnU-Net's split (None where the split does not say) and the report's
    note on where they came from. CompareError when a prediction is of a case outside its fold's split."""
    if not splits_file.is_file():
        return dict.fromkeys(folds), (f"{splits_file.name} not found in `{splits_file.parent}`: the expected cases "
                                      "are the predictions found, so a case missing for every trainer cannot be "
                                      "detected.")
    try:
        val = [set(split["val"]) for split in json.loads(splits_file.read_text())]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CompareError(f"{splits_file} is not nnU-Net's split file (a list of {{'train': [...], 'val': [...]}} "
                           f"per fold): {e}") from None
    expected = {f: val[f] if 0 <= f < len(val) else None for f in folds}
    for (trainer, fold), cases in found.items():
        foreign = sorted(set(cases) - expected[fold]) if expected[fold] is not None else []
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CompareError(
                f"{cases[foreign[0]].parent} holds predictions of {len(foreign)} case(s) not in fold {fold}'s "
                f"validation split in {splits_file} ({shown}): that fold was trained with another split. Retrain it "
                "with the current split, or restore the splits_final.json it was trained with")
    note = f"Expected cases: each fold's `val` list in `{splits_file}` (nnU-Net's split)."
    beyond = [str(f) for f in folds if expected[f] is None]
    if beyond:
        note += (f" Fold(s) {', '.join(beyond)} are not in it (nnU-Net then draws a random 80:20 split): there the "
                 "expected cases are the predictions found.")
    return expected, note


def _pair_cases(
    found: Mapping[tuple[str, int], Mapping[str, Path]],
    trainers: Sequence[str],
    folds: Sequence[int],
    expected: Mapping[int, set[str] | None],
) -> tuple[set[tuple[int, str]], list[tuple[int, str, list[str]]]]:
    """Cases present for every trainer, and ``(fold, case, trainers lacking it)`` for the other expected cases
    (the fold's split; where unknown, every case some trainer predicted)."""
    paired, excluded = set(), []
    for fold in folds:
        sets = {t: set(found[(t, fold)]) for t in trainers}
        common = set.intersection(*sets.values())
        paired |= {(fold, c) for c in common}
        cases = expected[fold] if expected[fold] is not None else set.union(*sets.values())
        for case in sorted(cases - common):
            excluded.append((fold, case, [t for t in trainers if case not in sets[t]]))
    if not paired:
        raise CompareError("no validation case is present for all trainers; nothing to compare")
    return paired, excluded


def _cases(
    found: Mapping[tuple[str, int], Mapping[str, Path]],
    preprocessed: Path,
    dataset_json: dict,
    command: str,
    labels: Mapping[int, str],
    ignore_label: int | None,
    tolerance: float | Mapping[int, float],
) -> list[_Case]:
    """One ``_Case`` per prediction, with its ground truth from ``gt_segmentations`` and nnU-Net's reader."""
    preprocess = f"run nnUNetv2_plan_and_preprocess -d {nnunet_dataset_id(preprocessed.name)}"
    gt_paths = {(t, f, case): preprocessed / "gt_segmentations" / pred.name
                for (t, f), cases in found.items() for case, pred in cases.items()}
    for gt_path in gt_paths.values():
        if not gt_path.is_file():
            raise CompareError(f"ground truth {gt_path} is missing; {preprocess}")
    gt_fix = f"delete it and {preprocess} (which copies the ground truth from nnUNet_raw again)"
    reader = _reader(dataset_json, min(gt_paths.values()), gt_fix)
    return [_Case(t, f, case, found[(t, f)][case], gt_path, list(labels), ignore_label, tolerance, reader,
                  f"regenerate it: {_val_command(command, f, t)}", gt_fix)
            for (t, f, case), gt_path in gt_paths.items()]


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
    from nnunetv2_llm.tools.predict_guard import nifti_problem

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


def _evaluate_case(task: _Case) -> list[dict]:
    from nnunetv2_llm.evaluation.metrics import case_metrics

    pred, pred_spacing = _read_seg(task.reader, task.prediction, task.prediction_fix)
    ref, spacing = _read_seg(task.reader, task.ground_truth, task.ground_truth_fix)
    if pred.shape != ref.shape or not np.allclose(pred_spacing, spacing, rtol=1e-3):
        raise CompareError(
            f"{task.prediction} (shape {pred.shape}, spacing {pred_spacing}) does not match its ground truth "
            f"{task.ground_truth} (shape {ref.shape}, spacing {spacing})"
        )
    if task.ignore_label is not None:  # voxels marked 'ignore' in the reference do not count
        pred = np.where(ref == task.ignore_label, 0, pred)
    rows = case_metrics(pred, ref, spacing, task.labels, task.tolerance)
    return [{"trainer": task.trainer, "fold": task.fold, "case": task.case, **row} for row in rows]


def _map(fn, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) < 2:
        return [fn(t) for t in tasks]
    with get_context("spawn").Pool(workers) as pool:  # spawn: fork is unsafe once torch has started threads
        return pool.map(fn, tasks)


def _trainer_order(trainers: Sequence[str]):
    rank = {t: i for i, t in enumerate(trainers)}
    return lambda col: col.map(rank) if col.name == "trainer" else col


def _paired_differences(paired_df: pd.DataFrame, trainers: Sequence[str]) -> pd.DataFrame:
    """Long table ``trainer, fold, case, label, label_name, metric, candidate, reference, diff``."""
    key = ["fold", "case", "label", "label_name"]
    melt = dict(value_vars=list(METRIC_TITLES), var_name="metric")
    ref = paired_df[paired_df["trainer"] == trainers[0]].melt(id_vars=key, value_name="reference", **melt)
    cand = paired_df[paired_df["trainer"] != trainers[0]]
    cand = cand.melt(id_vars=["trainer", *key], value_name="candidate", **melt)
    out = cand.merge(ref, on=[*key, "metric"], validate="many_to_one")
    out["diff"] = out["candidate"] - out["reference"]
    return out


def _curves_from_checkpoint(path: Path) -> pd.DataFrame:
    # weights_only: nothing in it can run code
    from nnunetv2_llm.trainers.reliability import CheckpointUnreadable, load_checkpoint_file

    log = load_checkpoint_file(path).get("logging")
    if not isinstance(log, dict):
        raise CheckpointUnreadable(str(path), "it holds no training log ('logging')")
    columns = {"train_loss": "train_losses", "val_loss": "val_losses", "pseudo_dice": "mean_fg_dice"}
    n = min(len(log[k]) for k in columns.values())
    return pd.DataFrame({"epoch": range(n), **{c: np.asarray(log[k][:n], dtype=float) for c, k in columns.items()}})


_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_VALUES = {"train_loss": re.compile(r": train_loss (\S+)"), "val_loss": re.compile(r": val_loss (\S+)")}
_PSEUDO_DICE = re.compile(r": Pseudo dice \[(.*)\]")


def _curves_from_logs(logs: Sequence[Path]) -> pd.DataFrame:
    """Parse nnU-Net text logs; a later log (resumed training) overrides the epochs it repeats."""
    epochs: dict[int, dict[str, float]] = {}
    current = None
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if m := _EPOCH.search(line):
                current = int(m[1])
                epochs[current] = {}
            elif current is not None:
                for key, pattern in _VALUES.items():
                    if m := pattern.search(line):
                        epochs[current][key] = float(m[1])
                if m := _PSEUDO_DICE.search(line):  # e.g. "[np.float32(0.81), np.float32(0.7)]"
                    values = [float(v) for v in re.sub(r"np\.\w+\(([^)]*)\)", r"\1", m[1]).split(",") if v.strip()]
                    epochs[current]["pseudo_dice"] = float(np.nanmean(values)) if values else np.nan
    rows = [{"epoch": e, **epochs[e]} for e in sorted(epochs)]
    return pd.DataFrame(rows, columns=["epoch", *CURVES])


def _plot_differences(diffs: pd.DataFrame, reference: str, path: Path) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    from nnunetv2_llm.evaluation.statistics import METRICS

    fig = Figure(figsize=(5 * len(METRICS), 4.5), layout="constrained")
    for i, (ax, metric) in enumerate(zip(fig.subplots(1, len(METRICS)), METRICS)):
        d = diffs[diffs["metric"] == metric]
        sns.boxplot(d, x="label_name", y="diff", hue="trainer", ax=ax, fill=False, showfliers=False,
                    legend="auto" if i == 0 else False)
        sns.stripplot(d, x="label_name", y="diff", hue="trainer", ax=ax, dodge=True, alpha=0.6, legend=False)
        ax.axhline(0, color="grey", lw=1, ls="--")
        better = "higher" if METRICS[metric].higher_is_better else "lower"
        ax.set(title=f"{METRIC_TITLES[metric]}: {better} is better", xlabel="class", ylabel=f"trainer - {reference}")
    n_cases = len(diffs[["fold", "case"]].drop_duplicates())
    fig.suptitle(f"Per-case paired differences to {reference} ({n_cases} paired cases)")
    fig.savefig(path, dpi=120)


def _plot_curves(
    curves: Mapping[tuple[str, int], tuple[pd.DataFrame | None, str]],
    trainers: Sequence[str],
    folds: Sequence[int],
    path: Path,
) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(CURVES), 4.5), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    colors = dict(zip(trainers, sns.color_palette(n_colors=len(trainers))))
    styles = ["-", "--", ":", "-."]
    for (trainer, fold), (found, _) in curves.items():
        if found is not None:
            for ax, column in zip(axes, CURVES):
                ax.plot(found["epoch"], found[column], color=colors[trainer],
                        ls=styles[list(folds).index(fold) % len(styles)], label=f"{trainer} fold {fold}")
    for ax, title in zip(axes, CURVES.values()):
        ax.set(title=title, xlabel="epoch")
    if any(found is not None for found, _ in curves.values()):
        axes[0].legend(fontsize="small")
    else:
        fig.suptitle("no training checkpoints or logs found")
    fig.savefig(path, dpi=120)


def _fmt(metric: str, x: float) -> str:
    return "n/a" if np.isnan(x) else (f"{x:.2f}" if metric == "hd95" else f"{x:.4f}")


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.4g}"


def _tolerance_text(tolerance: float | Mapping[int, float], labels: Mapping[int, str]) -> str:
    from nnunetv2_llm.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM

    if not isinstance(tolerance, Mapping):
        return f"{tolerance:g} mm"
    return ", ".join(f"{name} {tolerance.get(v, DEFAULT_NSD_TOLERANCE_MM):g} mm" for v, name in labels.items())


def _budget_warning(
    trainers: Sequence[str], folds: Sequence[int], epochs: Mapping[tuple[str, int], int | None]
) -> list[str]:
    """A visible warning line when, in some fold, the trainers were trained for different numbers of epochs."""
    unequal = []
    for fold in folds:
        known = {t: epochs[(t, fold)] for t in trainers if epochs[(t, fold)] is not None}
        if len(set(known.values())) > 1:
            unequal.append(f"fold {fold}: " + ", ".join(f"{t} {n}" for t, n in known.items()) + " epochs")
    if not unequal:
        return []
    return [f"**Warning: unequal training budgets** ({'; '.join(unequal)}): trainers trained for different numbers "
            "of epochs are not compared on equal terms; give every trainer the same budget variant.", ""]


def _llm_cells(trainer_dir: Path) -> list[str]:
    """LLM mixer, source, layer, the layer's dtype and sha256 (first 12 digits) from the model folder's plans.json,
    where nnunetv2_llm's trainers store them; '-' for a plain nnU-Net trainer."""
    from nnunetv2_llm.model.spec import PLANS_KEY

    path = trainer_dir / "plans.json"
    try:
        block = json.loads(path.read_text()).get(PLANS_KEY) if path.is_file() else "no plans.json"
    except (OSError, ValueError, AttributeError):
        block = "unreadable plans.json"
    if block is None:
        return ["-"] * 5
    if not isinstance(block, dict):
        return [str(block) if isinstance(block, str) else f"malformed `{PLANS_KEY}`", "?", "?", "?", "?"]
    lora = f" + LoRA rank {block['lora_rank']}" if block.get("lora_rank") else ""
    return [f"{block.get('mixer', '?')}{lora}", f"`{block.get('source', '?')}`", str(block.get("layer", "?")),
            str(block.get("dtype", "?")) if block.get("mixer") != "identity" else "-",
            (block.get("layer_sha256") or "-")[:12]]


def _settings_lines(
    trainers: Sequence[str],
    folds: Sequence[int],
    trainer_dirs: Mapping[str, Path],
    epochs: Mapping[tuple[str, int], int | None],
) -> list[str]:
    """The table of what each trainer folder was trained with."""
    lines = ["## What each trainer was trained with", "",
             "LLM block from the model folder's plans.json (key `nnunetv2_llm`); epochs trained = length of the "
             "training curves (see Training curves).", "",
             "| Trainer | LLM mixer | source | layer | layer dtype | layer sha256 | epochs trained |",
             "|---|---|---|---|---|---|---|"]
    for t in trainers:
        counts = ["?" if epochs[(t, f)] is None else str(epochs[(t, f)]) for f in folds]
        epochs_cell = counts[0] if len(set(counts)) == 1 else ", ".join(f"fold {f}: {n}" for f, n in zip(folds, counts))
        lines.append(f"| {t} | {' | '.join(_llm_cells(trainer_dirs[t]))} | {epochs_cell} |")
    return [*lines, ""]


def _validation_lines(
    excluded: list[tuple[int, str, list[str]]],
    unfinished: list[tuple[str, int]],
    split_note: str,
    expected: Mapping[int, set[str] | None],
    command: str,
) -> list[str]:
    """Expected cases without a prediction from every trainer, and validation runs that did not finish."""
    lines = ["## Cases excluded from the paired analysis", "", split_note, ""]
    lines += [f"- fold {f}, `{c}`: no prediction from {', '.join(missing)}. Regenerate: "
              + "; ".join(f"`{_val_command(command, f, t)}`" for t in missing) for f, c, missing in excluded]
    if not excluded:
        every = "expected" if all(cases is not None for cases in expected.values()) else "found"
        lines.append(f"None: every {every} validation case has a prediction from every trainer.")
    if unfinished:
        lines += ["", "Validation runs that did not finish (their missing cases are listed above):", ""]
        lines += [f"- `{t}` fold {f}: no validation/summary.json (nnU-Net's validation did not finish); rerun "
                  f"`{_val_command(command, f, t)}`" for t, f in unfinished]
    return [*lines, ""]


def _report(
    paired_df: pd.DataFrame,
    diffs: pd.DataFrame,
    trainers: Sequence[str],
    labels: Mapping[int, str],
    paired: set[tuple[int, str]],
    curves: Mapping[tuple[str, int], tuple[pd.DataFrame | None, str]],
    header: dict,
    sections: list[str],
) -> str:
    from nnunetv2_llm.evaluation.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS, holm, mean_sd, paired_comparison

    ref, folds = trainers[0], header["folds"]
    conventions = (
        "metrics per case and class with the image spacing (MONAI). Empty masks: reference and prediction both "
        "empty -> Dice 1, NSD 1, HD95 0; exactly one empty -> Dice 0, NSD 0, HD95 = image diagonal (mm). "
        "Axes of length 1 are dropped with their spacing (a single-slice image is measured in 2D). "
        "Dice/NSD: higher is better; HD95: lower is better. Differences are trainer - reference; a case is tied "
        f"when |difference| <= {METRICS['dice'].tie_tolerance:g} (Dice, NSD) or {METRICS['hd95'].tie_tolerance:g} mm "
        f"(HD95). 95% CI: paired BCa bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}). p: two-sided Wilcoxon signed-rank (all differences zero -> p = 1), Holm-corrected "
        "over all tests of the paired-difference table. Means and differences use the paired cases only."
    )
    per_fold = ", ".join(f"fold {f}: {sum(1 for pf, _ in paired if pf == f)}" for f in folds)
    lines = [
        f"# Trainer comparison: {header['name']}, {header['configuration']} ({header['plans']})",
        "",
        f"Reference trainer: `{ref}`. Compared: {', '.join(f'`{t}`' for t in trainers[1:])}.",
        "",
        f"Folds: {', '.join(map(str, folds))}; paired cases: {len(paired)} ({per_fold}); "
        f"NSD tolerance: {_tolerance_text(header['tolerance'], labels)}.",
        "",
        *sections,
        f"Conventions: {conventions}",
        "",
    ]
    lines += ["## Mean ± sd per trainer (paired cases)", "", f"| Class | Metric | {' | '.join(trainers)} |",
              "|---|---|" + "---|" * len(trainers)]
    for value, name in labels.items():
        for metric in METRICS:
            cells = []
            for t in trainers:
                mean, sd = mean_sd(paired_df.loc[(paired_df["trainer"] == t) & (paired_df["label"] == value), metric])
                cells.append(f"{_fmt(metric, mean)} ± {_fmt(metric, sd)}")
            lines.append(f"| {name} | {METRIC_TITLES[metric]} | {' | '.join(cells)} |")

    results = []
    for t in trainers[1:]:
        for value, name in labels.items():
            for metric in METRICS:
                g = diffs[(diffs["trainer"] == t) & (diffs["label"] == value) & (diffs["metric"] == metric)]
                r = paired_comparison(g["candidate"].to_numpy(), g["reference"].to_numpy(), metric)
                results.append((t, name, metric, r))
    p_holm = holm([r.p_value for *_, r in results])
    lines += ["", f"## Paired difference to `{ref}` (trainer - reference)", "",
              f"Holm correction over the {len(results)} tests of this table.", "",
              "| Trainer | Class | Metric | Δ mean ± sd | 95% CI | Wilcoxon p | Holm p | better / worse / tied |",
              "|---|---|---|---|---|---|---|---|"]
    for (t, name, metric, r), ph in zip(results, p_holm):
        lines.append(
            f"| {t} | {name} | {METRIC_TITLES[metric]} | {_fmt(metric, r.mean_diff)} ± {_fmt(metric, r.sd_diff)} | "
            f"[{_fmt(metric, r.ci_low)}, {_fmt(metric, r.ci_high)}] | {_fmt_p(r.p_value)} | {_fmt_p(ph)} | "
            f"{r.better} / {r.worse} / {r.tied} |"
        )
    lines += ["", "## Training curves", ""]
    lines += [f"- `{t}` fold {f}: {source}" for (t, f), (_, source) in curves.items()]
    lines += ["", "![paired differences](paired_differences.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)
