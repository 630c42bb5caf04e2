"""The shell environment nnU-Net needs to find this package's trainers and its data folders."""

from __future__ import annotations

import os
from pathlib import Path

import nnunetv2_llm

# The folder nnU-Net's lookup searches: inside the package, so that a wheel install has it too.
TRAINER_LOOKUP_DIR = Path(nnunetv2_llm.__file__).resolve().parent / "trainers" / "lookup"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with this package's trainer lookup folder added (once) to whatever is already set."""
    current = current if current is not None else os.environ.get("nnUNet_extTrainer", "")
    paths = [p for p in current.split(os.pathsep) if p]
    if str(TRAINER_LOOKUP_DIR) not in paths:
        paths.append(str(TRAINER_LOOKUP_DIR))
    return os.pathsep.join(paths)


def nnunet_env(work_dir: Path | None = None) -> dict[str, str]:
    """The variables to run nnU-Net with this package: the trainer lookup folder, and data folders (kept when set,
    else under ``work_dir``)."""
    # GNU OpenMP spin-waits by default; with nnU-Net's augmentation workers sharing the cores that made
    # CPU training steps up to 10x slower here. Passive waiting is the same for every trainer.
    env = {"nnUNet_extTrainer": ext_trainer_value(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for name in NNUNET_FOLDERS:
        value = os.environ.get(name)
        if not value and work_dir is not None:
            value = str(Path(work_dir).resolve() / name)
        if value:
            env[name] = value
    return env


def export_lines(work_dir: Path | None = None) -> str:
    """``nnunet_env`` as shell ``export`` lines, for ``eval "$(nnunetv2_llm info --exports)"``."""
    return "\n".join(f"export {k}='{v}'" for k, v in nnunet_env(work_dir).items())
