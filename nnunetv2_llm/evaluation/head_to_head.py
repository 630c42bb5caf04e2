"""``nnunetv2_llm head-to-head``: run what is missing, then compare.

Plans and preprocesses if needed, then trains every trainer on every fold through nnU-Net's own
``nnUNetv2_train`` (a finished fold is never retrained; an interrupted one continues with ``--c``; a finished
one without validation output gets ``--val``), then runs ``compare`` on nnU-Net's validation outputs.
Uses the shell's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``. The trainers, folds and output
folder (empty or new, unless ``--overwrite``) are checked before anything is prepared or trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import (
    check_device,
    check_trainer_names,
    check_training_request,
    dataset_folder,
    ensure_preprocessed,
    ensure_trained,
    nnunet_dataset_id,
    trainer_fold_dir,
)


def require_nnunet_env() -> dict[str, str]:
    """The environment with nnU-Net's three data folders, which must be set."""
    from nnunetv2_llm.common.environment import NNUNET_FOLDERS, nnunet_env

    env = nnunet_env()
    missing = [name for name in NNUNET_FOLDERS if name not in env]
    if missing:
        raise LLMSettingError(f"{', '.join(missing)} not set: nnU-Net needs its data folders "
                              "(see nnU-Net's setting_up_paths.md)", " ".join(f"export {m}=..." for m in missing))
    return env


def prepare_dataset(dataset_id: int, configuration: str, plans: str, env: dict[str, str]) -> None:
    """Check the raw dataset, then plan and preprocess unless done."""
    from nnunetv2_llm.common.dataset_checks import check_raw_dataset

    raw = dataset_folder(env["nnUNet_raw"], dataset_id)
    if raw is None:
        raise LLMSettingError(
            f"no Dataset{dataset_id:03d}_* folder in nnUNet_raw ({env['nnUNet_raw']}): convert an MSD task with "
            "`nnUNetv2_convert_MSD_dataset -i TaskXX_Name` or a MedVisionLlama folder with "
            "`nnunetv2_llm convert-datafile`", "-d / nnUNet_raw")
    check_raw_dataset(raw)  # also checks the paths dataset.json names
    ensure_preprocessed(dataset_id, configuration, env, plans)


def train_all(dataset_id: int, configuration: str, trainers: Sequence[str], folds: Sequence[str],
              env: dict[str, str], device: str, plans: str) -> None:
    """Fold by fold, every trainer, skipping what is finished; shows what runs and what is left."""
    from rich.console import Console

    console = Console(stderr=True)
    jobs = [(fold, trainer) for fold in folds for trainer in trainers]
    for i, (fold, trainer) in enumerate(jobs, 1):
        fold_dir = trainer_fold_dir(env, dataset_id, configuration, trainer, fold, plans)
        finished = fold_dir is not None and (fold_dir / "validation" / "summary.json").is_file()
        left = ", ".join(f"{t} f{f}" for f, t in jobs[i:]) or "nothing"
        resuming = fold_dir is not None and (fold_dir / "checkpoint_latest.pth").is_file()
        state = "done, skipped" if finished else "resuming" if resuming else "running"
        console.rule(f"[bold]head-to-head {i}/{len(jobs)}: {trainer} fold {fold} ({state})[/] — left: {left}")
        if not finished:
            ensure_trained(dataset_id, configuration, trainer, fold, env, device, plans)


def head_to_head(dataset: str | int, configuration: str, trainers: Sequence[str], folds: Sequence[int],
                 output_dir: Path, device: str = "cuda", plans: str = "nnUNetPlans", overwrite: bool = False) -> Path:
    """Train what is missing, then write the comparison report; returns the path of report.md."""
    from nnunetv2_llm.evaluation.compare.checks import check_comparable, check_output_dir
    from nnunetv2_llm.evaluation.compare.run import compare

    check_comparable(trainers, folds)
    check_output_dir(output_dir, overwrite)
    env = require_nnunet_env()
    dataset_id = nnunet_dataset_id(dataset)
    check_trainer_names(trainers)  # a misspelt name would fail only when its turn to train comes
    check_training_request(dataset_id, configuration, plans, folds, env)
    check_device(device)
    prepare_dataset(dataset_id, configuration, plans, env)
    train_all(dataset_id, configuration, trainers, [str(f) for f in folds], env, device, plans)
    return compare(dataset_folder(env["nnUNet_raw"], dataset_id).name, configuration, trainers, folds, output_dir,
                   plans, results_root=Path(env["nnUNet_results"]), preprocessed_root=Path(env["nnUNet_preprocessed"]),
                   overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="the first is the reference, e.g. nnUNetTrainer_20epochs nnUNetTrainerLLM_20epochs "
                             "nnUNetTrainerLLMNoLLM_20epochs")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, help="the report's folder: empty or new")
    parser.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty output folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))


def main(args: argparse.Namespace) -> int:
    report = head_to_head(args.dataset, args.configuration, args.trainers, args.folds, args.output_dir,
                          args.device, args.plans, args.overwrite)
    print(f"report: {report}")
    return 0
