"""Cheap checks that a folder is an nnU-Net v2 raw dataset, with a message that says what to run instead.

No image is read here: these checks look at ``dataset.json`` and file names only, so they run in
milliseconds before planning. nnU-Net's own ``--verify_dataset_integrity`` (which reads every image)
stays the thorough check.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from nnunetv2_llm.common.errors import LLMSettingError

DATAFILE = "data_file.txt"
REQUIRED_KEYS = ("channel_names", "labels", "file_ending", "numTraining")
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def load_dataset_json(folder: Path) -> dict:
    """``folder/dataset.json`` as a dict; unreadable or non-object JSON is an LLMSettingError naming the file."""
    path = folder / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMSettingError(f"{path} is not readable JSON: {e}", str(path)) from None
    if not isinstance(data, dict):
        raise LLMSettingError(f"{path} must hold a JSON object, not {type(data).__name__}", str(path))
    return data


def _looks_like_msd(data: dict) -> bool:
    """Medical Segmentation Decathlon layout: a "training" list of {"image", "label"} and no nnU-Net v2 keys."""
    training = data.get("training")
    return (isinstance(training, list) and any(isinstance(t, dict) and "image" in t for t in training)
            and "file_ending" not in data and "channel_names" not in data)


def check_raw_dataset(folder: str | os.PathLike) -> None:
    """Raise ``LLMSettingError`` saying what to do when ``folder`` is not an nnU-Net v2 raw dataset.

    Recognises the two layouts people bring instead: an MSD task folder (-> ``nnUNetv2_convert_MSD_dataset``)
    and a MedVisionLlama task folder with ``data_file.txt`` (-> ``nnunetv2_llm convert-datafile``).
    Otherwise names what is missing (``dataset.json``, ``imagesTr``, ``labelsTr``, required keys, channel
    suffixes, label files). Also runs :func:`check_dataset_json_paths`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LLMSettingError(f"dataset folder {folder} does not exist or is not a folder", "the dataset folder")
    has_datafile = (folder / DATAFILE).is_file()
    convert_hint = (f"it looks like a MedVisionLlama task folder ({DATAFILE}); convert it with "
                    f"`nnunetv2_llm convert-datafile -i {folder} -d ID` and use the DatasetXXX_Name folder it writes")

    if not (folder / "dataset.json").is_file():
        if has_datafile:
            raise LLMSettingError(f"{folder} is not an nnU-Net v2 raw dataset: {convert_hint}", "the dataset folder")
        raise LLMSettingError(f"{folder} is not an nnU-Net v2 raw dataset: it has no dataset.json "
                              "(needed keys: channel_names, labels, numTraining, file_ending)", "dataset.json")
    data = load_dataset_json(folder)

    if _looks_like_msd(data):
        raise LLMSettingError(
            f"{folder} is a Medical Segmentation Decathlon (MSD) task folder, not an nnU-Net v2 raw dataset "
            f"(dataset.json has a \"training\" list of image/label paths and no \"file_ending\"/\"channel_names\"); "
            f"convert it with `nnUNetv2_convert_MSD_dataset -i {folder}` (add `-overwrite_id ID` to choose the id)"
            + (f", or, since it also has {DATAFILE}, with `nnunetv2_llm convert-datafile -i {folder} -d ID`"
               if has_datafile else ""),
            "the dataset folder")

    missing_keys = [k for k in REQUIRED_KEYS if k not in data]
    if missing_keys:
        extra = f"; {convert_hint}" if has_datafile else ""
        raise LLMSettingError(f"{folder / 'dataset.json'} lacks the nnU-Net v2 keys {missing_keys} "
                              f"(see nnU-Net's documentation/dataset_format.md){extra}", "dataset.json")

    _check_keys(folder, data)
    check_dataset_json_paths(folder)
    if "dataset" not in data:
        _check_folders(folder, data, has_datafile)


def _check_keys(folder: Path, data: dict) -> None:
    """The required keys hold what nnU-Net v2 expects (types, channel numbering, the background label)."""
    where = folder / "dataset.json"
    channels, labels, ending = data["channel_names"], data["labels"], data["file_ending"]
    if not isinstance(channels, dict) or not channels:
        raise LLMSettingError(f'{where}: "channel_names" must be a non-empty object like {{"0": "MRI"}}',
                              "dataset.json")
    if sorted(channels) != [str(i) for i in range(len(channels))]:
        raise LLMSettingError(f'{where}: "channel_names" keys must be "0".."{len(channels) - 1}", '
                              f"got {sorted(channels)}", "dataset.json")
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise LLMSettingError(f'{where}: "labels" must be an object mapping names to values with "background": 0 '
                              f"(nnU-Net v2 maps name -> value, MSD maps value -> name), got {labels!r}",
                              "dataset.json")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise LLMSettingError(f'{where}: "file_ending" must be a string like ".nii.gz", got {ending!r}', "dataset.json")
    if not isinstance(data["numTraining"], int) or data["numTraining"] < 1:
        raise LLMSettingError(f'{where}: "numTraining" must be a positive integer, got {data["numTraining"]!r}',
                              "dataset.json")


def _check_folders(folder: Path, data: dict, has_datafile: bool) -> None:
    ending = data["file_ending"]
    for sub in ("imagesTr", "labelsTr"):
        if not (folder / sub).is_dir():
            hint = (f"; it has {DATAFILE}: convert it with `nnunetv2_llm convert-datafile -i {folder} -d ID`"
                    if has_datafile else "")
            raise LLMSettingError(f"{folder} has no {sub}/ folder (nnU-Net v2 needs imagesTr/ and labelsTr/ "
                                  f"unless dataset.json lists files under \"dataset\"){hint}", sub)
    images = sorted(p.name for p in (folder / "imagesTr").iterdir()
                    if p.name.endswith(ending) and not p.name.startswith("."))
    if not images:
        raise LLMSettingError(f"{folder / 'imagesTr'} holds no *{ending} files (file_ending in dataset.json)",
                              "imagesTr")
    without_suffix = [n for n in images if not _CHANNEL_SUFFIX.search(n[: -len(ending)])]
    if without_suffix:
        raise LLMSettingError(
            f"{folder / 'imagesTr'} has files without nnU-Net's 4-digit channel suffix, e.g. {without_suffix[0]} "
            f"(expected CASE_0000{ending}); an MSD-style folder is converted with "
            f"`nnUNetv2_convert_MSD_dataset -i FOLDER`", "imagesTr")
    cases: dict[str, set[str]] = {}
    for name in images:
        stem = name[: -len(ending)]
        cases.setdefault(stem[:-5], set()).add(stem[-4:])
    n_channels = len(data["channel_names"])
    expected = {f"{i:04d}" for i in range(n_channels)}
    wrong = sorted(c for c, ch in cases.items() if ch != expected)
    if wrong:
        raise LLMSettingError(
            f"{folder / 'imagesTr'}: case {wrong[0]} has channels {sorted(cases[wrong[0]])}, expected "
            f"{sorted(expected)} ({n_channels} channel(s) in channel_names)"
            + (f"; {len(wrong) - 1} more case(s) like it" if len(wrong) > 1 else ""), "imagesTr")
    no_label = sorted(c for c in cases if not (folder / "labelsTr" / f"{c}{ending}").is_file())
    if no_label:
        raise LLMSettingError(f"{folder / 'labelsTr'} lacks the label of {len(no_label)} case(s), e.g. "
                              f"{no_label[0]}{ending}", "labelsTr")
    if len(cases) != data["numTraining"]:
        raise LLMSettingError(f'{folder}: dataset.json says "numTraining": {data["numTraining"]} but imagesTr/ holds '
                              f"{len(cases)} case(s)", "dataset.json numTraining")


def _dataset_json_entries(data: dict) -> Iterator[tuple[str, object]]:
    """(where, path) for every file path a dataset.json names: MSD "training"/"test", nnU-Net v2 "dataset"."""
    for key in ("training", "test", "validation"):
        entries = data.get(key)
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                yield from _msd_entry_paths(f'"{key}"[{i}]', entry)
    yield from _dataset_dict_paths(data)


def _msd_entry_paths(where: str, entry: object) -> Iterator[tuple[str, object]]:
    """(where, path) of one MSD list entry: a path, or {"image": path(s), "label": path(s)}."""
    if not isinstance(entry, dict):
        yield where, entry
        return
    for field_name in ("image", "label"):
        if field_name in entry:
            value = entry[field_name]
            for j, v in enumerate(value if isinstance(value, list) else [value]):
                suffix = f"[{j}]" if isinstance(value, list) else ""
                yield f"{where}.{field_name}{suffix}", v


def _dataset_dict_paths(data: dict) -> Iterator[tuple[str, object]]:
    """(where, path) of nnU-Net v2's optional "dataset": {case: {"images": [...], "label": ...}}."""
    dataset = data.get("dataset")
    if isinstance(dataset, dict):
        for case, entry in dataset.items():
            if not isinstance(entry, dict):
                yield f'"dataset"["{case}"]', entry
                continue
            for j, image in enumerate(entry.get("images", []) or []):
                yield f'"dataset"["{case}"].images[{j}]', image
            if "label" in entry:
                yield f'"dataset"["{case}"].label', entry["label"]


def path_inside(folder: Path, value: str | os.PathLike) -> Path | None:
    """``value`` (relative to ``folder``, or absolute) resolved, symlinks followed; None when it leaves ``folder``."""
    root = folder.resolve()
    candidate = Path(value)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    return resolved if resolved == root or root in resolved.parents else None


def file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists but is not a folder (so ``folder`` cannot be created)."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def check_dataset_json_paths(folder: str | os.PathLike) -> None:
    """Raise ``LLMSettingError`` when a path named in ``folder/dataset.json`` leaves ``folder``.

    Covers MSD's "training"/"test" entries and nnU-Net v2's optional "dataset" dict. Paths are taken
    relative to the folder (as nnU-Net and MSD loaders do), ``$VARS`` are expanded (as nnU-Net does),
    then resolved with symlinks followed: ``../``, absolute paths elsewhere and links pointing out are refused.
    A folder without dataset.json passes (there is nothing to check).
    """
    folder = Path(folder).expanduser()
    if not (folder / "dataset.json").is_file():
        return
    data = load_dataset_json(folder)
    bad = []
    for where, value in _dataset_json_entries(data):
        if not isinstance(value, str) or not value.strip():
            bad.append(f"{where} = {value!r} is not a path")
            continue
        expanded = os.path.expandvars(value.strip())
        if path_inside(folder, expanded) is None:
            bad.append(f"{where} = {value!r} points outside the dataset folder")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise LLMSettingError(
            f"{folder / 'dataset.json'} names files outside {folder}: " + "; ".join(bad[:5]) + more
            + ". Keep every image and label inside the dataset folder (copy them in, or convert the dataset)",
            "dataset.json paths")
