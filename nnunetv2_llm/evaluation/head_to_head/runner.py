"""One training of the matrix, on whatever machine runs it: under the fold's lock, the ``nnUNetv2_train`` call that
is still missing (none, ``--c`` or ``--val``, decided only once the lock is held), its output in the job's log.

Two head-to-heads on the same ``nnUNet_results`` therefore never train one model folder's fold at once: the second
waits for the first, then finds the fold finished and skips it. The lock is a file next to the fold's folder
(``fold_0.lock``; the fold folder itself is nnU-Net's to create), taken with ``filelock`` (``fcntl`` on POSIX).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from nnunetv2_llm.common.nnunet_commands import NnUNetCommandError, model_fold_dir, nnunet_command, training_command
from nnunetv2_llm.evaluation.head_to_head.matrix import TrainingJob

SKIPPED, TRAINED = "skipped", "trained"


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` (created with its folder); ``on_wait`` is called once when another process
    holds it, before waiting for it without a time limit."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fold_lock_path(job: TrainingJob, env: Mapping[str, str]) -> Path:
    """``.../TRAINER__PLANS__CONFIGURATION/fold_F.lock``, beside the fold folder nnU-Net creates."""
    fold_dir = model_fold_dir(env, job.dataset_id, job.configuration, job.trainer, job.fold, job.plans)
    return fold_dir.with_name(f"{fold_dir.name}.lock")


def run_job(job: TrainingJob, env: dict[str, str], device: str | None, log_path: Path,
            on_wait: Callable[[], None] | None = None, on_start: Callable[[list[str]], None] | None = None) -> str:
    """Bring ``job``'s fold to finished under its lock; nnU-Net's output is appended to ``log_path``.

    Args:
        job: the training.
        env: the environment added to this process's (nnU-Net's folders, ``CUDA_VISIBLE_DEVICES``, ...).
        device: nnU-Net's ``-device``; None leaves nnU-Net's default.
        log_path: the job's log file (its folder is created).
        on_wait: called when another process holds the fold's lock.
        on_start: called with the command just before it runs.

    Returns:
        ``SKIPPED`` when the fold was already finished, else ``TRAINED``.

    Raises:
        NnUNetCommandError: nnU-Net exited non-zero (the message names the log).
    """
    with file_lock(fold_lock_path(job, env), on_wait):
        command = training_command(job.dataset_id, job.configuration, job.trainer, job.fold, env, device, job.plans)
        if command is None:
            return SKIPPED
        if on_start is not None:
            on_start(command)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            result = subprocess.run([nnunet_command(command[0]), *command[1:]], env={**os.environ, **env},
                                    stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise NnUNetCommandError(f"`{' '.join(command)}` failed with exit code {result.returncode} (log: {log_path})")
    return TRAINED
