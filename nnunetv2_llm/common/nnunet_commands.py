"""nnU-Net's own command-line entry points, run as subprocesses, each skipped when its output exists, and the checks
of what they are asked to do (dataset, trainer, configuration, plans, folds, device) before any of them runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunetv2_llm.common.dataset_checks import load_dataset_json
from nnunetv2_llm.common.environment import NNUNET_FOLDERS, nnunet_env
from nnunetv2_llm.common.errors import LLMSettingError

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "Task04_Hippocampus"


class NnUNetCommandError(RuntimeError):
    """An nnU-Net command exited non-zero; its own output has already been shown."""


def nnunet_command(name: str) -> str:
    """The console script next to this Python (so a venv works without being activated)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run(args: list[str], env: dict[str, str]) -> None:
    """Run an nnU-Net command with ``env`` added to this environment, echoing it first; its output goes straight
    to the terminal."""
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run([nnunet_command(args[0]), *args[1:]], env={**os.environ, **env})
    if result.returncode != 0:
        raise NnUNetCommandError(f"`{' '.join(args)}` failed with exit code {result.returncode}")


def nnunet_dataset_id(dataset: str | int) -> int:
    """4, '4', '004' or 'Dataset004_Hippocampus' -> 4."""
    text = str(dataset)
    digits = text[len("Dataset"):len("Dataset") + 3] if text.startswith("Dataset") else text
    if not digits.isdigit():
        raise LLMSettingError(f"dataset '{dataset}' is neither an id nor a DatasetXXX_Name", "-d")
    return int(digits)


def find_trainer_class(name: str) -> type:
    """This package's trainers directly (the classes nnU-Net's nnUNet_extTrainer lookup finds), others through
    nnU-Net's lookup. That lookup walks sys.modules while reading module attributes, which can import lazily and
    fail with 'dictionary changed size during iteration' once transformers is imported (seen with Python 3.12):
    it is retried."""
    import nnunetv2_llm.trainers as ours

    if isinstance(getattr(ours, name, None), type):
        return getattr(ours, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for attempt in range(3):
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError as e:
            if "changed size during iteration" not in str(e) or attempt == 2:
                raise


def check_trainer_names(names: Sequence[str], setting: str = "-tr") -> None:
    """LLMSettingError naming every name that is not an nnU-Net trainer class ``find_trainer_class`` finds
    (nnU-Net's own trainers, this package's and those under ``$nnUNet_extTrainer``)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    unknown = []
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
        for name in dict.fromkeys(names):
            try:
                if not issubclass(find_trainer_class(name), nnUNetTrainer):
                    unknown.append(name)
            except (RuntimeError, AssertionError):  # not found; found but not a trainer (nnU-Net asserts)
                unknown.append(name)
    if unknown:
        raise LLMSettingError(f"no nnU-Net trainer class named {', '.join(unknown)} (looked in nnU-Net, "
                              f"nnunetv2_llm and nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '')!r}); "
                              "check the spelling", setting)


def check_device(device: str, setting: str = "--device") -> None:
    """LLMSettingError when torch cannot use ``device`` ('cuda' or 'mps') here: nnU-Net would fail only after its
    setup, with a traceback."""
    if device not in ("cuda", "mps"):
        return
    import torch

    if not (torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()):
        raise LLMSettingError(f"device '{device}' was requested, but torch sees no {device.upper()} device on this "
                              "machine; use cpu (slow) or a machine with one", setting)


def dataset_folder(root: str, dataset_id: int) -> Path | None:
    """The ``DatasetXXX_*`` folder of ``dataset_id`` under an nnU-Net root, if any; several are an error (nnU-Net
    refuses them too)."""
    found = sorted(p for p in Path(root).glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) \
        if Path(root).is_dir() else []
    if len(found) > 1:
        raise LLMSettingError(f"dataset id {dataset_id} matches {len(found)} folders in {root} "
                              f"({', '.join(p.name for p in found)}); nnU-Net finds datasets by id, so rename or "
                              "remove all but one", "-d")
    return found[0] if found else None


def ensure_raw_from_msd(msd_folder: Path, dataset_id: int, env: dict[str, str]) -> Path:
    """The raw dataset of ``dataset_id``, converted from the MSD task folder unless it exists."""
    if dataset_folder(env["nnUNet_raw"], dataset_id) is None:
        run(["nnUNetv2_convert_MSD_dataset", "-i", str(msd_folder), "-overwrite_id", str(dataset_id), "-np", "2"], env)
    return dataset_folder(env["nnUNet_raw"], dataset_id)


# nnU-Net's planners for its plans presets (ResEnc presets: nnU-Net Revisited).
PLANNERS = {"nnUNetPlans": "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
            "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL", "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}
# The configurations those planners can write (3d_lowres and the cascade only for large images).
PLANNED_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
DEFAULT_FOLDS = 5  # nnU-Net's cross-validation before splits_final.json exists


def check_training_request(dataset_id: int, configuration: str, plans: str, folds: Sequence[str | int],
                           env: Mapping[str, str]) -> None:
    """LLMSettingError (naming -c, -p or -f) for a configuration the plans lack, plans this package cannot make, or
    a fold outside the dataset's split, before anything is planned or trained: nnU-Net would re-plan, fall back to
    its default planner, or train an unknown fold on a random split."""
    folder = dataset_folder(env["nnUNet_preprocessed"], dataset_id)
    plans_file = folder / f"{plans}.json" if folder is not None else None
    if plans_file is not None and plans_file.is_file():
        available = _planned_configurations(plans_file)
        where = str(plans_file)
    elif plans in PLANNERS:
        available, where = list(PLANNED_CONFIGURATIONS), f"what {PLANNERS[plans]} plans"
    else:
        raise LLMSettingError(f"plans '{plans}' do not exist for dataset {dataset_id} (no {plans}.json in "
                              f"nnUNet_preprocessed), and only {', '.join(PLANNERS)} can be planned here; make your "
                              "own plans with nnUNetv2_plan_experiment first", "-p")
    if configuration not in available:
        raise LLMSettingError(f"configuration '{configuration}' is not in {where} ({', '.join(available)})", "-c")
    check_folds(folder, folds)


def _planned_configurations(plans_file: Path) -> list[str]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        return PlansManager(str(plans_file)).available_configurations
    except (ValueError, KeyError, TypeError) as e:
        raise LLMSettingError(f"{plans_file} is not readable plans ({e}); remove it to re-plan", "-p") from None


def check_folds(preprocessed: Path | None, folds: Sequence[str | int], setting: str = "-f") -> None:
    """Every fold is 'all' or one of the split's (``splits_final.json``; nnU-Net's 5 before it exists)."""
    splits_file = preprocessed / "splits_final.json" if preprocessed is not None else None
    try:
        count = len(json.loads(splits_file.read_text())) if splits_file and splits_file.is_file() else DEFAULT_FOLDS
    except (OSError, ValueError, TypeError) as e:
        raise LLMSettingError(f"{splits_file} is unreadable ({e})", "splits_final.json") from None
    bad = [str(f) for f in folds if str(f) != "all" and not (str(f).isdigit() and int(f) < count)]
    if bad:
        raise LLMSettingError(f"fold {', '.join(bad)} is not in the dataset's {count}-fold split: use 0..{count - 1} "
                              "or all (nnU-Net would train any other fold on a random 80:20 split)", setting)


def ensure_preprocessed(dataset_id: int, configuration: str, env: dict[str, str], plans: str = "nnUNetPlans") -> None:
    """Plan (``PLANNERS``) or preprocess (the user's own plans) unless complete; re-fingerprint a replaced raw
    dataset."""
    raw = dataset_folder(env["nnUNet_raw"], dataset_id)
    folder = dataset_folder(env["nnUNet_preprocessed"], dataset_id)
    if is_preprocessed(folder, configuration, plans, raw):
        return
    changed = raw_dataset_changed(folder, raw)
    if plans in PLANNERS:
        run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-pl", PLANNERS[plans],
             *(["--clean"] if changed else []), "--verify_dataset_integrity", "-np", "2"], env)
    elif changed:
        raise LLMSettingError(f"{raw / 'dataset.json'} differs from the one plans '{plans}' were made from "
                              f"({folder / 'dataset.json'}): re-plan with your planner (nnUNetv2_plan_and_preprocess "
                              f"-d {dataset_id} -pl PLANNER --clean)", "-p")
    else:
        run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", plans, "-c", configuration, "-np", "2"], env)
    if not is_preprocessed(dataset_folder(env["nnUNet_preprocessed"], dataset_id), configuration, plans, raw):
        raise LLMSettingError(f"nnU-Net's preprocessing did not produce {configuration} of plans '{plans}' for "
                              f"dataset {dataset_id} (its output above says why)", "-c / -p")


def _dataset_json_or_none(folder: Path) -> dict | None:
    """``folder/dataset.json``, None when it is missing or unreadable (then nothing can be compared or counted)."""
    try:
        return load_dataset_json(folder)
    except LLMSettingError:
        return None


def raw_dataset_changed(preprocessed: Path | None, raw: Path | None) -> bool:
    """The raw dataset's dataset.json differs from the copy nnU-Net's planner put beside the preprocessed data."""
    return preprocessed is not None and raw is not None and (preprocessed / "dataset.json").is_file() and \
        _dataset_json_or_none(raw) != _dataset_json_or_none(preprocessed)


def is_preprocessed(folder: Path | None, configuration: str, plans: str, raw: Path | None = None) -> bool:
    """The configuration is planned and every case preprocessed: nnU-Net creates the data folder first and writes each
    case's ``.pkl`` last, so an interrupted run leaves fewer than dataset.json's numTraining; with ``raw``, its
    dataset.json must also be the one the data was made from."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if folder is None or not (folder / f"{plans}.json").is_file() or raw_dataset_changed(folder, raw):
        return False
    try:
        identifier = PlansManager(str(folder / f"{plans}.json")).get_configuration(configuration).data_identifier
    except (KeyError, RuntimeError, ValueError):  # configuration not planned (yet), or unreadable plans
        return False
    expected = (_dataset_json_or_none(folder) or {}).get("numTraining")
    data = folder / identifier
    return data.is_dir() and len(list(data.glob("*.pkl"))) == expected


def trainer_folder(results: str, dataset_id: int, trainer: str, plans: str, configuration: str) -> Path | None:
    """nnU-Net's model folder ``results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION`` (it may not exist yet);
    None when the dataset has no folder under ``results``."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    dataset = dataset_folder(results, dataset_id)
    return dataset / convert_trainer_plans_config_to_identifier(trainer, plans, configuration) if dataset else None


def trainer_fold_dir(env: dict[str, str], dataset_id: int, configuration: str, trainer: str, fold: str,
                     plans: str = "nnUNetPlans") -> Path | None:
    """The fold's folder in ``trainer_folder`` under ``env["nnUNet_results"]``."""
    folder = trainer_folder(env["nnUNet_results"], dataset_id, trainer, plans, configuration)
    return folder / f"fold_{fold}" if folder else None


def training_command(dataset_id: int, configuration: str, trainer: str, fold: str, env: dict[str, str],
                     device: str | None, plans: str = "nnUNetPlans") -> list[str] | None:
    """The ``nnUNetv2_train`` arguments that bring the fold to finished, None when it is finished (a final
    checkpoint and nnU-Net's validation summary).

    Args:
        dataset_id, configuration, trainer, fold, plans: the training, as nnU-Net names it.
        env: nnU-Net's folders (``nnUNet_results`` is read).
        device: nnU-Net's ``-device`` (cuda, cpu, mps); None leaves nnU-Net's default.

    Returns:
        Plain training when nothing is there, ``--c`` after an interruption (a latest checkpoint, no final one),
        ``--val`` for a finished training without validation output; None when nothing is left to do.
    """
    fold_dir = trainer_fold_dir(env, dataset_id, configuration, trainer, fold, plans)
    finished = fold_dir is not None and (fold_dir / "checkpoint_final.pth").is_file()
    if finished and (fold_dir / "validation" / "summary.json").is_file():
        return None
    resume = ["--c"] if fold_dir and (fold_dir / "checkpoint_latest.pth").is_file() else []
    return ["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans,
            *(["-device", device] if device else []), *(["--val"] if finished else resume)]


def model_fold_dir(env: Mapping[str, str], dataset_id: int, configuration: str, trainer: str, fold: str,
                   plans: str = "nnUNetPlans") -> Path:
    """Where nnU-Net will write the fold (``trainer_fold_dir``), also before its dataset folder exists under
    ``nnUNet_results`` (named then like the raw dataset's folder, as nnU-Net names it).

    Raises:
        LLMSettingError: the dataset is in neither ``nnUNet_results`` nor ``nnUNet_raw``.
    """
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    dataset = dataset_folder(env["nnUNet_results"], dataset_id) or dataset_folder(env["nnUNet_raw"], dataset_id)
    if dataset is None:
        raise LLMSettingError(f"no Dataset{dataset_id:03d}_* folder in nnUNet_raw ({env['nnUNet_raw']})", "-d")
    return Path(env["nnUNet_results"]) / dataset.name / \
        convert_trainer_plans_config_to_identifier(trainer, plans, configuration) / f"fold_{fold}"


def ensure_trained(dataset_id: int, configuration: str, trainer: str, fold: str, env: dict[str, str],
                   device: str, plans: str = "nnUNetPlans") -> None:
    """Train unless finished; an interrupted run continues from its latest checkpoint (``--c``)."""
    command = training_command(dataset_id, configuration, trainer, fold, env, device, plans)
    if command is not None:
        run(command, env)


def demo_env(work_dir: Path) -> dict[str, str]:
    """nnU-Net folders under ``work_dir`` (whatever the shell has set), plus the trainers folder."""
    env = nnunet_env()
    env.update({name: str(work_dir.resolve() / name) for name in NNUNET_FOLDERS})
    for name in NNUNET_FOLDERS:
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    return env
