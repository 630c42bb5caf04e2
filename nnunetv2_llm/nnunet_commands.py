"""nnU-Net's own command-line entry points, run as subprocesses, each skipped when its output exists."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_llm.environment import nnunet_env

FIXTURE = Path(__file__).resolve().parent / "data" / "Task04_Hippocampus"


class NnUNetCommandError(RuntimeError):
    """An nnU-Net command exited non-zero; its own output has already been shown."""


def nnunet_command(name: str) -> str:
    """The console script next to this Python (so a venv works without being activated)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run(args: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run([nnunet_command(args[0]), *args[1:]], env={**os.environ, **env})
    if result.returncode != 0:
        raise NnUNetCommandError(f"`{' '.join(args)}` failed with exit code {result.returncode}")


def nnunet_dataset_id(dataset: str | int) -> int:
    """4, '4', '004' or 'Dataset004_Hippocampus' -> 4."""
    from nnunetv2_llm.errors import LLMSettingError

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

    from nnunetv2_llm.errors import LLMSettingError

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


def dataset_folder(root: str, dataset_id: int) -> Path | None:
    """The ``DatasetXXX_*`` folder of ``dataset_id`` under an nnU-Net root, if any."""
    found = sorted(Path(root).glob(f"Dataset{dataset_id:03d}_*")) if Path(root).is_dir() else []
    return found[0] if found else None


def ensure_raw_from_msd(msd_folder: Path, dataset_id: int, env: dict[str, str]) -> Path:
    if dataset_folder(env["nnUNet_raw"], dataset_id) is None:
        run(["nnUNetv2_convert_MSD_dataset", "-i", str(msd_folder), "-overwrite_id", str(dataset_id), "-np", "2"], env)
    return dataset_folder(env["nnUNet_raw"], dataset_id)


# nnU-Net's planners for its plans presets (ResEnc presets: nnU-Net Revisited).
PLANNERS = {"nnUNetPlans": "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
            "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL", "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}


def ensure_preprocessed(dataset_id: int, configuration: str, env: dict[str, str], plans: str = "nnUNetPlans") -> None:
    if not is_preprocessed(dataset_folder(env["nnUNet_preprocessed"], dataset_id), configuration, plans):
        planner = ["-pl", PLANNERS[plans]] if plans in PLANNERS else []
        run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, *planner,
             "--verify_dataset_integrity", "-np", "2"], env)


def is_preprocessed(folder: Path | None, configuration: str, plans: str) -> bool:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if folder is None or not (folder / f"{plans}.json").is_file():
        return False
    try:
        identifier = PlansManager(str(folder / f"{plans}.json")).get_configuration(configuration).data_identifier
    except (KeyError, RuntimeError):  # configuration not planned (yet)
        return False
    return (folder / identifier).is_dir()


def trainer_fold_dir(env: dict[str, str], dataset_id: int, configuration: str, trainer: str, fold: str,
                     plans: str = "nnUNetPlans") -> Path | None:
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    results = dataset_folder(env["nnUNet_results"], dataset_id)
    return results / convert_trainer_plans_config_to_identifier(trainer, plans, configuration) / f"fold_{fold}" \
        if results else None


def ensure_trained(dataset_id: int, configuration: str, trainer: str, fold: str, env: dict[str, str],
                   device: str, plans: str = "nnUNetPlans") -> None:
    """Train unless finished; an interrupted run continues from its latest checkpoint (``--c``)."""
    fold_dir = trainer_fold_dir(env, dataset_id, configuration, trainer, fold, plans)
    if fold_dir and (fold_dir / "checkpoint_final.pth").is_file():
        if not (fold_dir / "validation" / "summary.json").is_file():
            run(["nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-p", plans,
                 "-device", device, "--val"], env)
        return
    resume = ["--c"] if fold_dir and (fold_dir / "checkpoint_latest.pth").is_file() else []
    run(["nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-p", plans,
         "-device", device, *resume], env)


def demo_env(work_dir: Path) -> dict[str, str]:
    """nnU-Net folders under ``work_dir`` (whatever the shell has set), plus the trainers folder."""
    env = nnunet_env()
    env.update({name: str(work_dir.resolve() / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    return env

