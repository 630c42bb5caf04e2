"""``nnunetv2_llm head-to-head``: train what is missing for every dataset, trainer, seed and fold, then compare.

The matrix (datasets x trainers x seeds x folds) becomes independent ``nnUNetv2_train`` jobs: a finished fold is
never retrained, an interrupted one continues with ``--c``, a finished one without validation output gets
``--val``; each dataset is planned and preprocessed once, before its trainings. ``--launcher local`` runs up to
``--jobs`` trainings at once on this machine (one GPU each from ``--gpus``, round-robin, or the CPU) with a live
view and one log per training under ``-o/logs``; ``--launcher slurm`` submits one SLURM job per training (submitit)
and waits, or with ``--no-wait`` exits after submitting: the same command again collects. Two head-to-heads on the
same ``nnUNet_results`` never train one fold at once (a lock file per fold). Then ``compare`` runs on nnU-Net's
validation outputs. Uses the shell's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``; everything asked
for (trainers, folds, launcher, output folder: empty or new, unless ``--overwrite``) is checked before anything is
prepared or trained.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import (
    NnUNetCommandError,
    check_device,
    check_trainer_names,
    check_training_request,
    dataset_folder,
    ensure_preprocessed,
    ensure_trained,
    nnunet_dataset_id,
    training_command,
)
from nnunetv2_llm.common.trainer_names import check_seeds, seed_runs
from nnunetv2_llm.evaluation.head_to_head.local import DONE, DONE_SKIPPED, FAILED
from nnunetv2_llm.evaluation.head_to_head.matrix import TrainingJob, job_matrix
from nnunetv2_llm.evaluation.head_to_head.runner import file_lock, fold_lock_path
from nnunetv2_llm.evaluation.head_to_head.slurm import SlurmSettings, check_slurm_settings

LAUNCHERS = ("local", "slurm")
OWN_STATE = ("logs", "slurm")  # head-to-head's own files in -o, kept between runs (not an earlier report)


@dataclass(frozen=True)
class LaunchSettings:
    """Where the trainings run: ``launcher`` (local or slurm), ``jobs`` at once and ``gpus`` (local), ``slurm``."""

    launcher: str = "local"
    jobs: int = 1
    gpus: tuple[str, ...] | None = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def check_launch(launch: LaunchSettings, device: str) -> None:
    """LLMSettingError for a launch that cannot work (unknown launcher, ``--jobs`` < 1, GPUs for a CPU run, SLURM
    missing)."""
    if launch.launcher not in LAUNCHERS:
        raise LLMSettingError(f"unknown launcher '{launch.launcher}': use {' or '.join(LAUNCHERS)}", "--launcher")
    if launch.jobs < 1:
        raise LLMSettingError(f"--jobs must be at least 1, got {launch.jobs}", "--jobs")
    if launch.gpus is not None:
        if device != "cuda":
            raise LLMSettingError(f"--gpus chooses CUDA devices, but --device is {device}", "--gpus / --device")
        if launch.launcher == "slurm":
            raise LLMSettingError("--gpus is for --launcher local; SLURM assigns GPUs (--slurm-gpus-per-job)",
                                  "--gpus")
        if not launch.gpus or not all(g.strip().isdigit() for g in launch.gpus):
            raise LLMSettingError(f"--gpus takes GPU indices separated by commas (0,1,2,3), got "
                                  f"{','.join(launch.gpus)!r}", "--gpus")
    if launch.launcher == "slurm":
        check_slurm_settings(launch.slurm)
    elif not launch.slurm.wait:
        raise LLMSettingError("--no-wait is for --launcher slurm (local trainings end with head-to-head)",
                              "--no-wait")


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
    """Check the raw dataset, then plan and preprocess unless done (one head-to-head at a time per dataset)."""
    from nnunetv2_llm.common.dataset_checks import check_raw_dataset

    raw = dataset_folder(env["nnUNet_raw"], dataset_id)
    if raw is None:
        raise LLMSettingError(
            f"no Dataset{dataset_id:03d}_* folder in nnUNet_raw ({env['nnUNet_raw']}): convert an MSD task with "
            "`nnUNetv2_convert_MSD_dataset -i TaskXX_Name` or a MedVisionLlama folder with "
            "`nnunetv2_llm convert-datafile`", "-d / nnUNet_raw")
    check_raw_dataset(raw)  # also checks the paths dataset.json names
    preprocessed = env.get("nnUNet_preprocessed")
    lock = Path(preprocessed) / f".Dataset{dataset_id:03d}.lock" if preprocessed else None
    if lock is None:
        ensure_preprocessed(dataset_id, configuration, env, plans)
        return
    with file_lock(lock, lambda: print(f"waiting: another process preprocesses dataset {dataset_id}", flush=True)):
        ensure_preprocessed(dataset_id, configuration, env, plans)


def train_all(dataset_id: int, configuration: str, trainers: Sequence[str], folds: Sequence[str],
              env: dict[str, str], device: str, plans: str) -> None:
    """Fold by fold, every trainer, one at a time with nnU-Net's output on this terminal (sweep-layers), skipping
    what is finished; each fold under its lock, like head-to-head's launchers."""
    from rich.console import Console

    console = Console(stderr=True)
    jobs = job_matrix([dataset_id], configuration, trainers, folds, plans=plans)
    for i, job in enumerate(jobs, 1):
        command = training_command(dataset_id, configuration, job.trainer, job.fold, env, device, plans)
        left = ", ".join(f"{j.trainer} f{j.fold}" for j in jobs[i:]) or "nothing"
        state = "done, skipped" if command is None else "resuming" if "--c" in command else "running"
        console.rule(f"[bold]{i}/{len(jobs)}: {job.trainer} fold {job.fold} ({state})[/] — left: {left}")
        if command is not None:  # decided again under the lock: another process may have finished it meanwhile
            with file_lock(fold_lock_path(job, env), lambda: console.print("waiting: another process trains it")):
                ensure_trained(dataset_id, configuration, job.trainer, job.fold, env, device, plans)


def launch(jobs: Sequence[TrainingJob], env: dict[str, str], device: str, output_dir: Path, settings: LaunchSettings):
    """Run ``jobs`` with the chosen launcher; returns their ``JobStatus`` list."""
    if settings.launcher == "slurm":
        from nnunetv2_llm.evaluation.head_to_head.slurm import SlurmLauncher

        return SlurmLauncher(env, device, output_dir, settings.slurm).run(jobs)
    from nnunetv2_llm.evaluation.head_to_head.local import LocalLauncher

    return LocalLauncher(env, device, output_dir, settings.jobs, settings.gpus).run(jobs)


def head_to_head(datasets: Sequence[str | int], configuration: str, trainers: Sequence[str], folds: Sequence[int],
                 output_dir: Path, device: str = "cuda", plans: str = "nnUNetPlans", overwrite: bool = False,
                 seeds: Sequence[int] | None = None, settings: LaunchSettings | None = None) -> Path | None:
    """Train what is missing, then write the comparison report.

    Args:
        datasets: nnU-Net dataset ids or names.
        configuration, plans: nnU-Net's configuration and plans identifier.
        trainers: the compared trainers; the first is the reference.
        folds: cross-validation folds.
        output_dir: the report's folder (empty or new unless ``overwrite``), with the trainings' logs.
        device: nnU-Net's ``-device`` for every training.
        seeds: None, or the seeds each trainer is trained with (``{trainer}_seed{K}``).
        settings: where the trainings run (default: one at a time on this machine).

    Returns:
        The path of report.md; None when SLURM jobs are still queued or running (``--no-wait``).

    Raises:
        LLMSettingError: bad input, before anything is prepared or trained.
        NnUNetCommandError: trainings failed (all others ran to their end first; the message names the logs).
    """
    from nnunetv2_llm.evaluation.compare.checks import check_comparable, check_output_dir
    from nnunetv2_llm.evaluation.compare.run import compare

    settings = settings or LaunchSettings()
    check_comparable(trainers, folds)
    check_seeds(seeds)
    check_output_dir(output_dir, overwrite, keep=OWN_STATE)
    check_launch(settings, device)
    env = require_nnunet_env()
    dataset_ids = list(dict.fromkeys(nnunet_dataset_id(d) for d in datasets))
    check_trainer_names(list(seed_runs(trainers, seeds)))  # a misspelt name would fail only when its turn comes
    for dataset_id in dataset_ids:
        check_training_request(dataset_id, configuration, plans, folds, env)
    if settings.launcher == "local":  # SLURM jobs check theirs on their node (a login node may have no GPU)
        check_device(device)
    for dataset_id in dataset_ids:
        prepare_dataset(dataset_id, configuration, plans, env)
    statuses = launch(job_matrix(dataset_ids, configuration, trainers, folds, seeds, plans), env, device,
                      output_dir, settings)
    failed = [s for s in statuses if s.state == FAILED]
    if failed:
        raise NnUNetCommandError(f"{len(failed)} of {len(statuses)} trainings failed: "
                                 + "; ".join(f"{s.job.name} ({s.error})" for s in failed))
    if any(s.state not in (DONE, DONE_SKIPPED) for s in statuses):
        return None
    names = [dataset_folder(env["nnUNet_raw"], d).name for d in dataset_ids]
    # The folder was checked above, keeping the logs: compare's own check would count them as an earlier report.
    return compare(names, configuration, trainers, folds, output_dir, plans, seeds=seeds,
                   results_root=Path(env["nnUNet_results"]), preprocessed_root=Path(env["nnUNet_preprocessed"]),
                   overwrite=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--datasets", "--dataset", nargs="+", required=True, dest="datasets",
                        help="dataset ids or names, e.g. 4 27 220")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="the first is the reference, e.g. nnUNetTrainer_20epochs nnUNetTrainerLLM_20epochs "
                             "nnUNetTrainerLLMNoLLM_20epochs")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train each trainer once per seed ({trainer}_seed{K}); default: once, unseeded")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-o", "--output-dir", type=Path, required=True,
                        help="the report's folder (empty or new), with the trainings' logs in logs/")
    parser.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty output folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))
    parser.add_argument("--launcher", default="local", help="local (this machine, default) or slurm (submitit)")
    parser.add_argument("--jobs", type=int, default=1, help="local: trainings at once (default 1)")
    parser.add_argument("--gpus", default=None,
                        help="local: GPU indices the parallel trainings use, round-robin (0,1,2,3)")
    slurm = parser.add_argument_group("SLURM (--launcher slurm: one job per training)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", default=SlurmSettings.time, help="each job's time limit (default %(default)s)")
    slurm.add_argument("--slurm-gpus-per-job", type=int, default=SlurmSettings.gpus_per_job)
    slurm.add_argument("--slurm-mem", default=None, help="each job's memory, e.g. 32G")
    slurm.add_argument("--slurm-extra", default="", help="further sbatch options, e.g. '--account=abc --qos=high'")
    slurm.add_argument("--max-resubmits", type=int, default=SlurmSettings.max_resubmits,
                       help="resubmissions (continuing with --c) of a job the scheduler killed (default 2)")
    slurm.add_argument("--no-wait", action="store_true",
                       help="exit after submitting; the same command again collects the jobs and compares")


def launch_settings(args: argparse.Namespace) -> LaunchSettings:
    """The launch the parsed arguments ask for (checked later, by ``check_launch``)."""
    slurm = SlurmSettings(partition=args.slurm_partition, time=args.slurm_time, gpus_per_job=args.slurm_gpus_per_job,
                          mem=args.slurm_mem, extra=args.slurm_extra, max_resubmits=args.max_resubmits,
                          wait=not args.no_wait)
    gpus = tuple(args.gpus.split(",")) if args.gpus is not None else None
    return LaunchSettings(args.launcher, args.jobs, gpus, slurm)


def main(args: argparse.Namespace) -> int:
    report = head_to_head(args.datasets, args.configuration, args.trainers, args.folds, args.output_dir,
                          args.device, args.plans, args.overwrite, args.seeds, launch_settings(args))
    if report is None:
        print(f"SLURM jobs submitted (their list: {args.output_dir / 'slurm' / 'jobs.json'}); run the same command "
              "again to collect them and compare")
    else:
        print(f"report: {report}")
    return 0
