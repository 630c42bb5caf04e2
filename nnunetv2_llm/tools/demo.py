"""``nnunetv2_llm demo``: the main job on the embedded default, with nnU-Net's own commands.

Converts the embedded MSD Hippocampus subset, plans and preprocesses 3d_fullres, trains the LLM trainer at
a short CPU budget on fold 0, and predicts the unlabelled scan. Each step is skipped when its output exists,
so running it again resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunetv2_llm.common.environment import NNUNET_FOLDERS
from nnunetv2_llm.common.errors import setting_names
from nnunetv2_llm.common.nnunet_commands import (
    FIXTURE,
    check_device,
    check_trainer_names,
    check_training_request,
    demo_env,
    ensure_preprocessed,
    ensure_raw_from_msd,
    ensure_trained,
    run,
    trainer_fold_dir,
)

DATASET_ID = 4
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"


def run_demo(work_dir: str | Path, trainer: str, device: str, fold: str) -> Path:
    """Run the demo; returns the predictions folder."""
    work = Path(work_dir)
    check_trainer_names([trainer], "--trainer")  # before converting and planning, not when its training starts
    check_device(device, "--device")
    env = demo_env(work)
    with setting_names(**{"-f": "--fold"}):
        check_training_request(DATASET_ID, CONFIGURATION, PLANS, [fold], env)
    raw = ensure_raw_from_msd(FIXTURE, DATASET_ID, env)
    ensure_preprocessed(DATASET_ID, CONFIGURATION, env)
    ensure_trained(DATASET_ID, CONFIGURATION, trainer, fold, env, device)
    predictions = work.resolve() / "predictions" / trainer
    if not list(predictions.glob("*.nii.gz")):
        run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", str(DATASET_ID),
             "-c", CONFIGURATION, "-f", fold, "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1"], env)
    fold_dir = trainer_fold_dir(env, DATASET_ID, CONFIGURATION, trainer, fold)
    print("\nDone.")
    print(f"  model folder:        {fold_dir.parent}")
    print(f"  validation (fold {fold}): {fold_dir / 'validation'} (summary.json: nnU-Net's own metrics)")
    print(f"  training curves:     {fold_dir / 'progress.png'}")
    print(f"  prediction:          {predictions}")
    print("  To use these folders in your shell:")
    for name in (*NNUNET_FOLDERS, "nnUNet_extTrainer"):
        print(f"    export {name}='{env[name]}'")
    return predictions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="nnunetv2_llm_demo", help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("--trainer", default="nnUNetTrainerLLM_10epochs_25iters")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--fold", default="0")


def main(args: argparse.Namespace) -> int:
    run_demo(args.work_dir, args.trainer, args.device, args.fold)
    return 0
