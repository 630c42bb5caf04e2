"""``nnunetv2_llm convert-datafile``: a MedVisionLlama task folder -> an nnU-Net v2 raw dataset.

MedVisionLlama lists its training pairs in ``Data_Folder/TaskXX_Name/data_file.txt``, one
``image,label`` pair per line, paths relative to the task folder. This writes
``$nnUNet_raw/DatasetXXX_Name/{imagesTr,labelsTr,dataset.json}`` (``CASE_0000.nii.gz`` images, one file per
channel; ``CASE.nii.gz`` labels), after checking every line: paths must stay inside the task folder, files
must exist and read in full (not truncated), and image and label must share size and spacing. Nothing is
written unless every line passes; an existing dataset is replaced only with ``--overwrite``, and never when
it is, holds or sits inside the input.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_llm.common.dataset_checks import load_dataset_json, path_inside
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.images import IMAGE_ENDINGS, check_image
from nnunetv2_llm.common.nnunet_commands import dataset_folder

DEFAULT_DATAFILE = "data_file.txt"
FILE_ENDING = ".nii.gz"
MAX_LISTED = 12


@dataclass
class Pair:
    line: int
    case: str
    image: Path  # resolved, inside the task folder
    label: Path
    image_text: str  # as written in the data file
    label_text: str


@dataclass
class Geometry:
    channels: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def _ending(name: str) -> str | None:
    lower = name.lower()
    return next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)


def _raise_all(problems: list[str], what: str, setting: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise LLMSettingError(f"{what} (fix: {setting}):\n  " + "\n  ".join(problems[:MAX_LISTED]) + more)


def parse_datafile(task: Path, datafile: Path) -> list[Pair]:
    """The data file's pairs, checked; every problem is reported at once, each with its line number.

    Blank lines and ``#`` comments are skipped; a first line naming no image file (e.g. ``image,label``) is
    taken as a header; fields are stripped of whitespace and may be quoted (CSV rules).
    """
    try:
        text = datafile.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LLMSettingError(f"cannot read the data file {datafile}: {e}", "--datafile") from None
    pairs: list[Pair] = []
    problems: list[str] = []
    seen_images: dict[Path, int] = {}
    seen_cases: dict[str, int] = {}
    for number, line, fields in _datafile_entries(text):
        where = f"line {number} ({line!r})"
        resolved = _resolve_pair(task, where, fields, problems)
        if resolved is None:
            continue
        image, label = resolved
        image_name = Path(fields[0]).name
        case = image_name[: -len(_ending(image_name))]
        problem = _duplicate_problem(where, fields[0], image, case, seen_images, seen_cases)
        if problem:
            problems.append(problem)
            continue
        seen_images[image], seen_cases[case] = number, number
        pairs.append(Pair(number, case, image, label, fields[0], fields[1]))
    _raise_all(problems, f"{datafile} has problems", "the data file")
    if not pairs:
        raise LLMSettingError(f"{datafile} lists no image,label pairs", "the data file")
    return pairs


def _datafile_entries(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, stripped line, its CSV fields) of every line that is neither blank, a comment nor the header
    (a first line naming no image file, announced on stdout)."""
    first = True
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([line], skipinitialspace=True))]
        while fields and not fields[-1]:
            fields.pop()  # trailing comma
        if first and not any(_ending(f) for f in fields):
            print(f"convert-datafile: line {number} ({line!r}) names no image file; skipped as a header")
        else:
            yield number, line, fields
        first = False


def _resolve_pair(task: Path, where: str, fields: list[str], problems: list[str]) -> tuple[Path, Path] | None:
    """The line's image and label resolved inside ``task``; None after adding what is wrong to ``problems``."""
    if len(fields) != 2 or not all(fields):
        problems.append(f"{where}: expected 'image,label' (two comma-separated paths), found {len(fields)} "
                        "field(s)")
        return None
    resolved = []
    for kind, value in zip(("image", "label"), fields, strict=True):
        if _ending(value) is None:
            problems.append(f"{where}: {kind} '{value}' is not an image file ({', '.join(IMAGE_ENDINGS)})")
            continue
        path = path_inside(task, Path(value).expanduser())
        if path is None:
            problems.append(f"{where}: {kind} '{value}' points outside the task folder {task} "
                            f"('..', an absolute path elsewhere, or a symlink out); entries must be inside it")
        elif not path.is_file():
            problems.append(f"{where}: {kind} file '{value}' does not exist (looked for {path})")
        else:
            resolved.append(path)
    return (resolved[0], resolved[1]) if len(resolved) == 2 else None


def _duplicate_problem(where: str, image_text: str, image: Path, case: str, seen_images: dict[Path, int],
                       seen_cases: dict[str, int]) -> str | None:
    """Why the line's case cannot be added (no case name, an image or case name listed before), else None."""
    if not case:
        return f"{where}: image '{image_text}' has no file name to use as the case name"
    if image in seen_images:
        return f"{where}: image '{image_text}' is already listed on line {seen_images[image]}"
    if case in seen_cases:
        return (f"{where}: case name '{case}' (from the image file name) is already used on line "
                f"{seen_cases[case]}; nnU-Net needs unique case names")
    return None


def read_geometry(path: Path) -> Geometry:
    """Header only (no voxels). A 4-D image is taken as channels along its 4th axis, as MSD stores them."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    dim, size = reader.GetDimension(), reader.GetSize()
    spacing, origin = reader.GetSpacing(), reader.GetOrigin()
    direction = reader.GetDirection()
    channels = reader.GetNumberOfComponents()
    if dim == 4:
        channels *= size[3]
        d = [direction[i * 4 + j] for i in range(3) for j in range(3)]
        return Geometry(channels, tuple(size[:3]), tuple(spacing[:3]), tuple(origin[:3]), tuple(d))
    return Geometry(channels, tuple(size), tuple(spacing), tuple(origin), tuple(direction))


def check_files(pairs: list[Pair]) -> None:
    """Every image and label must read in full: SimpleITK reads a truncated file without error (the missing
    voxels become zeros), so each is checked by ``images.check_image``; all bad files at once."""
    problems = []
    for pair in pairs:
        for kind, path, text in (("image", pair.image, pair.image_text), ("label", pair.label, pair.label_text)):
            problem = check_image(path)
            if problem:
                problems.append(f"line {pair.line}: {kind} '{text}' ({path}): {problem}")
    _raise_all(problems, "image/label files are truncated, corrupt or unreadable",
               "replace these files, or remove their lines from the data file")


def check_geometry(pairs: list[Pair]) -> tuple[int, list[str]]:
    """Size and spacing of image and label must match (errors, all lines at once); origin or direction
    differences are returned as warnings (nnU-Net's own check warns about them too). Returns the channels.
    Expects files that passed ``check_files``."""
    import numpy as np

    problems, warnings, channels = [], [], {}
    for pair in pairs:
        where = f"line {pair.line} ({pair.image_text}, {pair.label_text})"
        image, label = read_geometry(pair.image), read_geometry(pair.label)
        if len(image.size) != 3 or len(label.size) != 3 or label.channels != 1:
            problems.append(f"{where}: expected a 3-D image (or 4-D with channels last) and a 3-D single-channel "
                            f"label, got image size {image.size} x {image.channels} channel(s), label size "
                            f"{label.size} x {label.channels}")
            continue
        if image.size != label.size:
            problems.append(f"{where}: image size {image.size} != label size {label.size}")
        elif not np.allclose(image.spacing, label.spacing):
            problems.append(f"{where}: image spacing {image.spacing} != label spacing {label.spacing}")
        if not np.allclose(image.origin, label.origin, atol=1e-3):
            warnings.append(f"{where}: origin differs (image {image.origin}, label {label.origin})")
        if not np.allclose(image.direction, label.direction, atol=1e-4):
            warnings.append(f"{where}: direction differs")
        channels.setdefault(image.channels, []).append(pair.line)
    if len(channels) > 1:
        problems.append("images have different numbers of channels: " + "; ".join(
            f"{c} channel(s) on lines {lines[:5]}" for c, lines in sorted(channels.items())))
    _raise_all(problems, "image/label geometry does not match", "the data file's pairs")
    return next(iter(channels)), warnings


def label_values(pairs: list[Pair]) -> dict[int, list[int]]:
    """Label value -> lines where it occurs. Values must be non-negative integers."""
    import numpy as np
    import SimpleITK as sitk

    found: dict[int, list[int]] = {}
    problems = []
    for pair in pairs:
        values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(pair.label))))
        if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 0:
            problems.append(f"line {pair.line}: label '{pair.label_text}' holds values that are not non-negative "
                            f"integers: {values[:8].tolist()}")
            continue
        for v in values.astype(int).tolist():
            found.setdefault(v, []).append(pair.line)
    _raise_all(problems, "labels are not integer label maps", "the label files")
    return found


def _task_dataset_json(task: Path) -> dict:
    """The MSD dataset.json that usually sits next to data_file.txt (labels and modality); empty when there is
    no readable one (then the labels and channels come from the flags or the files)."""
    try:
        return load_dataset_json(task)
    except LLMSettingError:
        return {}


def _split_names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",")] if value else None


def resolve_labels(names: list[str] | None, found: dict[int, list[int]], task_json: dict) -> dict[str, int]:
    """nnU-Net's name -> value map: from ``--labels`` (in value order), else the task's MSD dataset.json,
    else inferred from the values found (``background``, ``label_1``, ...)."""
    source = "--labels"
    if names is None and isinstance(task_json.get("labels"), dict) and task_json["labels"]:
        msd = task_json["labels"]
        try:  # MSD: {"0": "background", "1": "Anterior"}; nnU-Net v2: {"background": 0, ...}
            by_value = {int(k): str(v) for k, v in msd.items()}
        except (TypeError, ValueError):
            by_value = {int(v): str(k) for k, v in msd.items() if isinstance(v, int)}
        if sorted(by_value) == list(range(len(by_value))):
            names, source = [by_value[i] for i in range(len(by_value))], "the task folder's dataset.json"
    if names is None:
        names, source = ["background"] + [f"label_{v}" for v in range(1, max(found) + 1)], "the label values"
        print(f"convert-datafile: labels inferred from the label values: {names} (name them with --labels)")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise LLMSettingError(f"label names must be non-empty and unique, got {names}", "--labels")
    if names[0] != "background":
        print(f"convert-datafile: label 0 '{names[0]}' is stored as 'background' (nnU-Net requires that name)")
        names = ["background", *names[1:]]
    beyond = {v: lines for v, lines in found.items() if v >= len(names)}
    if beyond:
        detail = "; ".join(f"value {v} (lines {lines[:5]})" for v, lines in sorted(beyond.items()))
        raise LLMSettingError(f"the labels from {source} name values 0..{len(names) - 1} ({names}) but the label "
                              f"files hold {detail}", "--labels")
    return {name: value for value, name in enumerate(names)}


def resolve_channels(names: list[str] | None, channels: int, task_json: dict) -> dict[str, str]:
    """``channel_names`` for dataset.json. The name matters: nnU-Net normalises a channel named 'CT' with
    CT normalisation, anything else with z-score."""
    if names is None:
        modality = task_json.get("modality") or task_json.get("channel_names")
        if isinstance(modality, dict) and sorted(modality) == [str(i) for i in range(channels)]:
            names = [str(modality[str(i)]) for i in range(channels)]
        else:
            names = ["image"] if channels == 1 else [f"channel_{i}" for i in range(channels)]
            print(f"convert-datafile: channel names {names} (name them with --channel-names; 'CT' selects "
                  f"nnU-Net's CT normalisation)")
    if len(names) != channels or not all(names):
        raise LLMSettingError(f"{len(names)} channel name(s) {names} given, but the images have {channels} "
                              f"channel(s)", "--channel-names")
    return {str(i): n for i, n in enumerate(names)}


def default_name(task: Path) -> str:
    """The task folder's name without MSD's ``TaskXX_`` prefix."""
    match = re.match(r"^Task\d+_(.+)$", task.name)
    return match.group(1) if match else task.name


def target_folder(output_root: Path, dataset_id: int, name: str, overwrite: bool,
                  inputs: tuple[Path, ...] = ()) -> Path:
    """``output_root/DatasetXXX_Name``, checked: a valid id and name, no overlap with ``inputs`` (``--overwrite``
    deletes it), no other dataset with that id, a folder that can be created and no silent overwrite."""
    from nnunetv2_llm.common.outputs import OutputRule, check_output_folder

    if not 1 <= dataset_id <= 999:
        raise LLMSettingError(f"dataset id {dataset_id} is out of range: nnU-Net ids are 1..999", "-d")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise LLMSettingError(f"dataset name '{name}' must be letters, digits, '_', '-' or '.'", "--name")
    target = output_root / f"Dataset{dataset_id:03d}_{name}"
    for path in inputs:
        path = path.resolve()
        if path_inside(path, target) or path_inside(target, path):
            raise LLMSettingError(f"the dataset folder {target} would be, hold or sit inside the input {path}; "
                                  "the input would be overwritten or deleted, so write the dataset elsewhere",
                                  "--output-root / --name / -d")
    others = sorted(p.name for p in output_root.glob(f"Dataset{dataset_id:03d}_*") if p != target) \
        if output_root.is_dir() else []
    if others:
        raise LLMSettingError(f"dataset id {dataset_id} is already used by {others} in {output_root}; nnU-Net "
                              "finds datasets by id, so pick another id or remove that folder", "-d")
    check_output_folder(target, overwrite, OutputRule(
        what="the dataset", setting="--output-root / nnUNet_raw", outputs=None, refusal_setting="--overwrite",
        refusal="{folder} already exists; pass --overwrite to replace it"))
    return target


def _write_image(source: Path, case: str, folder: Path, channels: int) -> None:
    """``CASE_XXXX.nii.gz`` per channel: a 3-D .nii.gz is copied byte for byte, anything else goes through
    SimpleITK (4-D split along the 4th axis as nnU-Net's MSD converter does)."""
    if channels == 1 and source.name.lower().endswith(".nii.gz"):
        shutil.copyfile(source, folder / f"{case}_0000{FILE_ENDING}")
        return
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    if image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1:
        sitk.WriteImage(image, str(folder / f"{case}_0000{FILE_ENDING}"))
        return
    if image.GetDimension() == 3:  # vector pixels
        parts = [sitk.VectorIndexSelectionCast(image, i) for i in range(image.GetNumberOfComponentsPerPixel())]
    else:
        array = sitk.GetArrayFromImage(image)  # (C, z, y, x)
        direction = np.array(image.GetDirection()).reshape(4, 4)[:3, :3].reshape(-1)
        parts = []
        for c in range(array.shape[0]):
            part = sitk.GetImageFromArray(array[c])
            part.SetSpacing(image.GetSpacing()[:3])
            part.SetOrigin(image.GetOrigin()[:3])
            part.SetDirection(tuple(direction))
            parts.append(part)
    for c, part in enumerate(parts):
        sitk.WriteImage(part, str(folder / f"{case}_{c:04d}{FILE_ENDING}"))


def _write_label(source: Path, case: str, folder: Path) -> None:
    if source.name.lower().endswith(".nii.gz"):
        shutil.copyfile(source, folder / f"{case}{FILE_ENDING}")
    else:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.ReadImage(str(source)), str(folder / f"{case}{FILE_ENDING}"))


def convert_datafile(task_folder: str | os.PathLike, dataset_id: int, name: str | None = None,
                     datafile: str | os.PathLike = DEFAULT_DATAFILE, labels: list[str] | None = None,
                     channel_names: list[str] | None = None, output_root: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Write the nnU-Net raw dataset and return its folder. Every check runs before anything is written;
    the dataset is assembled in a temporary sibling folder and moved into place at the end."""
    task, datafile_path, root = _locations(task_folder, datafile, output_root)
    name = name or default_name(task)
    target = target_folder(root, dataset_id, name, overwrite, inputs=(task, datafile_path))

    pairs = parse_datafile(task, datafile_path)
    check_files(pairs)
    channels, warnings = check_geometry(pairs)
    for w in warnings[:MAX_LISTED]:
        print(f"convert-datafile: warning: {w}")
    found = label_values(pairs)
    task_json = _task_dataset_json(task)
    label_map = resolve_labels(labels, found, task_json)
    channel_map = resolve_channels(channel_names, channels, task_json)
    dataset_json = {
        "channel_names": channel_map,
        "labels": label_map,
        "numTraining": len(pairs),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": f"converted by nnunetv2_llm convert-datafile from {datafile_path}",
        "converted_from": {"task_folder": str(task), "datafile": str(datafile_path),
                           "pairs": {p.case: [p.image_text, p.label_text] for p in pairs}},
    }

    stale = preprocessed_folder(dataset_id) if target.exists() else None
    _write_dataset(target, pairs, channels, dataset_json)
    if stale is not None:
        print(f"convert-datafile: warning: {stale} holds nnU-Net's preprocessed data of the replaced dataset, now "
              f"stale: re-run nnUNetv2_plan_and_preprocess -d {dataset_id} --clean --verify_dataset_integrity",
              file=sys.stderr)
    return target


def _locations(task_folder: str | os.PathLike, datafile: str | os.PathLike,
               output_root: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """(task folder, data file, output root), resolved and checked to exist (the root: to be named)."""
    task = Path(task_folder).expanduser()
    if not task.is_dir():
        raise LLMSettingError(f"task folder {task} does not exist or is not a folder", "-i")
    task = task.resolve()
    datafile_path = Path(datafile).expanduser()
    datafile_path = datafile_path if datafile_path.is_absolute() else task / datafile_path
    if not datafile_path.is_file():
        raise LLMSettingError(f"data file {datafile_path} does not exist (MedVisionLlama's layout is "
                              f"TASK/{DEFAULT_DATAFILE} with one 'image,label' pair per line)", "--datafile")
    root_value = output_root if output_root not in (None, "") else os.environ.get("nnUNet_raw")
    if not root_value:
        raise LLMSettingError("no output root: pass --output-root or set nnUNet_raw", "--output-root / nnUNet_raw")
    return task, datafile_path, Path(root_value).expanduser().resolve()


def _write_dataset(target: Path, pairs: list[Pair], channels: int, dataset_json: dict) -> None:
    """imagesTr/, labelsTr/ and dataset.json, written into a temporary sibling of ``target`` that replaces it only
    when complete (``target`` exists here only with --overwrite)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        (partial / "imagesTr").mkdir(parents=True)
        (partial / "labelsTr").mkdir()
        for pair in pairs:
            _write_image(pair.image, pair.case, partial / "imagesTr", channels)
            _write_label(pair.label, pair.case, partial / "labelsTr")
        (partial / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def preprocessed_folder(dataset_id: int) -> Path | None:
    """This id's folder in ``$nnUNet_preprocessed``, if any."""
    root = os.environ.get("nnUNet_preprocessed")
    return dataset_folder(root, dataset_id) if root else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="MedVisionLlama task folder (Data_Folder/TaskXX_Name)")
    parser.add_argument("--datafile", default=DEFAULT_DATAFILE,
                        help="the pairs file, relative to the task folder or absolute (default: data_file.txt); "
                             "the paths in it are always relative to the task folder")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", help="dataset name (default: the task folder name without 'TaskXX_')")
    parser.add_argument("--labels", help="label names in value order, e.g. background,Anterior,Posterior "
                                         "(default: the task's MSD dataset.json, else inferred from the values)")
    parser.add_argument("--channel-names", help="channel names in order, e.g. MRI or T1,T2 ('CT' selects CT "
                                                "normalisation; default: the task's MSD dataset.json modality)")
    parser.add_argument("--output-root", help="where DatasetXXX_Name is written (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_Name folder")


def main(args: argparse.Namespace) -> int:
    target = convert_datafile(args.input, args.dataset_id, name=args.name, datafile=args.datafile,
                              labels=_split_names(args.labels), channel_names=_split_names(args.channel_names),
                              output_root=args.output_root, overwrite=args.overwrite)
    data = load_dataset_json(target)
    print(f"wrote {data['numTraining']} case(s) to {target}")
    print(f"  channels: {data['channel_names']}  labels: {data['labels']}")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} --verify_dataset_integrity")
    return 0
