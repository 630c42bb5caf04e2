"""What a comparison compares: the trainer folders, their validation predictions, each fold's expected cases
(the ``val`` list of nnU-Net's ``splits_final.json``; without that file, the predictions found), the cases every
trainer predicted (paired) and the ones some did not (excluded), and what each folder was trained with."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.nnunet_commands import nnunet_dataset_id
from nnunetv2_llm.evaluation.compare.checks import CompareError, check_tolerance

if TYPE_CHECKING:
    from nnunetv2_llm.model.spec import BottleneckSpec

Predictions = Mapping[tuple[str, int], Mapping[str, Path]]  # {(trainer, fold): {case: prediction path}}


@dataclass(frozen=True)
class Discovery:
    """Everything found before any image is read.

    name/configuration/plans: the dataset folder's name and what the trainers were trained with.
    trainers, folds: as given; the first trainer is the reference.
    trainer_dirs: each trainer's model folder. preprocessed: the dataset's folder in nnUNet_preprocessed.
    command: ``nnUNetv2_train ...`` with ``{fold}`` and ``{trainer}`` left to fill in.
    dataset_json: the dataset's dataset.json (``file_ending`` defaults to .nii.gz).
    labels: foreground ``{value: name}``; ignore_label: the 'ignore' value or None.
    tolerance: the NSD tolerance in mm, one value or ``{label value: mm}``.
    predictions: the validation predictions. expected: each fold's expected cases (None: not known).
    split_note: the report's sentence on where the expected cases came from.
    paired: ``(fold, case)`` predicted by every trainer; excluded: ``(fold, case, trainers lacking it)``.
    unfinished: ``(trainer, fold)`` whose validation wrote no summary.json.
    """

    name: str
    configuration: str
    plans: str
    trainers: list[str]
    folds: list[int]
    trainer_dirs: dict[str, Path]
    preprocessed: Path
    command: str
    dataset_json: dict
    labels: dict[int, str]
    ignore_label: int | None
    tolerance: float | Mapping[int, float]
    predictions: Predictions
    expected: dict[int, set[str] | None]
    split_note: str
    paired: set[tuple[int, str]]
    excluded: list[tuple[int, str, list[str]]]
    unfinished: list[tuple[str, int]]


def discover(dataset: str | int, configuration: str, trainers: Sequence[str], folds: Sequence[int], plans: str,
             tolerance: float | Mapping[int, float], results_root: Path | None,
             preprocessed_root: Path | None) -> Discovery:
    """Find the trainers' validation predictions and pair their cases (arguments as ``run.write_comparison``).

    Raises:
        CompareError: the dataset or nnU-Net's folders cannot be found, dataset.json has no usable labels, a
            tolerance is invalid, a trainer/fold has no validation output (naming the command to run), a
            prediction is of a case outside its fold's split, or no case is predicted by every trainer.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

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
    check_tolerance(tolerance, labels)
    found = _validation_predictions(trainer_dirs, folds, command, dataset_json["file_ending"])
    expected, split_note = _expected_cases(preprocessed / "splits_final.json", found, folds)
    paired, excluded = _pair_cases(found, trainers, folds, expected)
    unfinished = [(t, f) for t in trainers for f in folds
                  if not (trainer_dirs[t] / f"fold_{f}" / "validation" / "summary.json").is_file()]
    return Discovery(name, configuration, plans, list(trainers), list(folds), trainer_dirs, preprocessed, command,
                     dataset_json, labels, ignore_label, tolerance, found, expected, split_note, paired, excluded,
                     unfinished)


def val_command(command: str, fold: int, trainer: str) -> str:
    """The command that (re)writes a finished fold's validation output (``command``: ``Discovery.command``)."""
    return command.format(fold=fold, trainer=trainer) + " --val"


def trained_with(trainer_dir: Path) -> BottleneckSpec | str | None:
    """The LLM block a trainer folder was trained with, from its plans.json: the spec, None for a plain nnU-Net
    trainer, or why it cannot be shown ('no plans.json', 'unreadable plans.json', 'malformed `nnunetv2_llm`')."""
    from nnunetv2_llm.model.spec import PLANS_FILE, PLANS_KEY, BottleneckSpec, MalformedSpec, PlansUnreadable

    if not (trainer_dir / PLANS_FILE).is_file():
        return "no plans.json"
    try:
        return BottleneckSpec.from_model_folder(trainer_dir, required=False)
    except PlansUnreadable:
        return "unreadable plans.json"
    except MalformedSpec:
        return f"malformed `{PLANS_KEY}`"


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
            if not preds:
                why, run = _why_missing(fold_dir, command, fold, trainer)
                missing.append(f"- {fold_dir / 'validation'}: no predictions; {why}. Run: {run}")
    if missing:
        raise CompareError("validation output missing:\n" + "\n".join(missing))
    return found


def _why_missing(fold_dir: Path, command: str, fold: int, trainer: str) -> tuple[str, str]:
    """Why a fold has no validation predictions, and the command that produces them."""
    if (fold_dir / "checkpoint_final.pth").is_file():
        return ("training finished (checkpoint_final.pth) but validation was not run",
                val_command(command, fold, trainer))
    train = command.format(fold=fold, trainer=trainer)
    if (fold_dir / "checkpoint_latest.pth").is_file():
        return "training has not finished (only checkpoint_latest.pth)", train + " --c"
    return "this fold has not been trained", train


def _expected_cases(
    splits_file: Path, found: Predictions, folds: Sequence[int]
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
    for (_, fold), cases in found.items():
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
    found: Predictions,
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
