"""``--launcher slurm``: one SLURM job per training, submitted with submitit; each runs ``runner.run_job`` on its node
(the fold's lock, then the missing ``nnUNetv2_train`` call).

The submitted jobs are recorded in ``<-o>/slurm/jobs.json`` (with submitit's own files under ``<-o>/slurm/<id>``), so
that a second identical call collects what a first call submitted (``--no-wait``) instead of submitting it again.
A job that left the queue without a result (time limit, preemption, node failure, ``scancel``) is resubmitted, at
most ``max_resubmits`` times; its fold then continues from its latest checkpoint (``--c``). Whether a job is still
queued comes from ``squeue``, which needs no accounting database (``sacct`` does).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_llm.common.atomic_files import atomic_file
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import training_command
from nnunetv2_llm.evaluation.head_to_head.local import DONE, DONE_SKIPPED, FAILED, QUEUED, RUNNING, JobStatus, render
from nnunetv2_llm.evaluation.head_to_head.matrix import TrainingJob
from nnunetv2_llm.evaluation.head_to_head.runner import SKIPPED, run_job

PENDING, RESUBMITTED = "pending", "resubmitted"


@dataclass(frozen=True)
class SlurmSettings:
    """What each training's SLURM job asks for, and how head-to-head follows them.

    partition: ``--partition`` (None: the cluster's default).
    time: ``--time`` of each job (SLURM's formats: ``MM``, ``HH:MM:SS``, ``D-HH``).
    gpus_per_job: ``--gpus-per-node`` (0: none, for CPU partitions).
    mem: ``--mem`` (``32G``; None: the partition's default).
    extra: further sbatch options, as on sbatch's command line (``--account=abc --qos=high``).
    max_resubmits: how often a job killed by the scheduler is resubmitted.
    wait: follow the jobs until all ended; False returns after submitting.
    poll_s: seconds between two looks at the queue.
    """

    partition: str | None = None
    time: str = "24:00:00"
    gpus_per_job: int = 1
    mem: str | None = None
    extra: str = ""
    max_resubmits: int = 2
    wait: bool = True
    poll_s: float = 10.0


def sbatch_options(extra: str) -> dict[str, str | bool]:
    """``--account=abc --qos high --exclusive`` -> ``{"account": "abc", "qos": "high", "exclusive": True}``.

    Raises:
        LLMSettingError: something other than long options (``--name[=value]``).
    """
    words, options = shlex.split(extra), {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise LLMSettingError(f"'{word}' in --slurm-extra is not a long sbatch option (--name=value)",
                                  "--slurm-extra")
        name, sep, value = word[2:].partition("=")
        if not sep and i + 1 < len(words) and not words[i + 1].startswith("--"):
            value, sep, i = words[i + 1], "=", i + 1
        options[name] = value if sep else True
        i += 1
    return options


def check_slurm_settings(settings: SlurmSettings) -> None:
    """LLMSettingError when SLURM cannot be used from here or a setting is impossible, before anything runs."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise LLMSettingError("--launcher slurm needs SLURM's sbatch and squeue on PATH (none found here); run "
                              "head-to-head on the cluster's login node, or use --launcher local", "--launcher")
    if settings.gpus_per_job < 0:
        raise LLMSettingError(f"--slurm-gpus-per-job must be >= 0, got {settings.gpus_per_job}", "--slurm-gpus-per-job")
    if settings.max_resubmits < 0:
        raise LLMSettingError(f"--max-resubmits must be >= 0, got {settings.max_resubmits}", "--max-resubmits")
    sbatch_options(settings.extra)


def queued_jobs() -> dict[str, str]:
    """``{job id: SLURM state}`` of every job in the queue (pending, running, completing, ...)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.split())


class SlurmLauncher:
    """Submits the trainings that are not finished, follows them (``settings.wait``), resubmits killed ones."""

    def __init__(self, env: dict[str, str], device: str, output_dir: Path, settings: SlurmSettings) -> None:
        self.env, self.device, self.settings = env, device, settings
        self.folder = Path(output_dir).resolve() / "slurm"
        self.records_file = self.folder / "jobs.json"
        self.output_dir = Path(output_dir).resolve()
        self._executor = None

    def run(self, jobs: Sequence[TrainingJob]) -> list[JobStatus]:
        """Submit (or collect) ``jobs``; returns their statuses, still ``pending``/``running`` ones when not
        waiting."""
        from rich.console import Console
        from rich.live import Live

        console = Console(stderr=True)
        statuses = [JobStatus(job, job.log_path(self.output_dir)) for job in jobs]
        records = self._load()
        with Live(render(statuses), console=console, refresh_per_second=1) as live:
            while True:
                self._step(statuses, records, console)
                self._save(records)
                live.update(render(statuses))
                if not self.settings.wait or all(s.state in (DONE, DONE_SKIPPED, FAILED) for s in statuses):
                    return statuses
                time.sleep(self.settings.poll_s)

    def _step(self, statuses: list[JobStatus], records: dict[str, dict], console) -> None:
        """One look at the queue: submit what is new, record what ended, resubmit what was killed."""
        queue = self.queue()
        for status in statuses:
            if status.state in (DONE, DONE_SKIPPED, FAILED):
                continue
            record = records.get(status.job.name)
            if record is None:
                self._submit_or_skip(status, records, console)
            elif record["job_id"] in queue:
                status.state = RUNNING if queue[record["job_id"]] == "RUNNING" else PENDING
            elif self.has_result(record["job_id"]):
                self._collect(status, records.pop(status.job.name), console)
            elif record["resubmits"] < self.settings.max_resubmits:
                record["job_id"] = self.submit(status.job)
                record["resubmits"] += 1
                status.state = RESUBMITTED
                console.print(f"{status.job.name}: SLURM job left the queue without a result (time limit, "
                              f"preemption?): resubmitted as {record['job_id']} ({record['resubmits']}/"
                              f"{self.settings.max_resubmits})")
            else:
                records.pop(status.job.name)
                status.state, status.error = FAILED, (f"killed by the scheduler {record['resubmits'] + 1} times "
                                                      f"(last job {record['job_id']}); see {self.folder}")
                console.print(f"{status.job.name}: failed: {status.error}")

    def _submit_or_skip(self, status: JobStatus, records: dict[str, dict], console) -> None:
        job = status.job
        if training_command(job.dataset_id, job.configuration, job.trainer, job.fold, self.env, None,
                            job.plans) is None:
            status.state = DONE_SKIPPED  # finished before: no job at all
            console.print(f"{job.name}: {DONE_SKIPPED}")
            return
        records[job.name] = {"job_id": self.submit(job), "resubmits": 0}
        status.state = QUEUED
        console.print(f"{job.name}: submitted as SLURM job {records[job.name]['job_id']} (log: {status.log})")

    def _collect(self, status: JobStatus, record: dict, console) -> None:
        try:
            outcome = self.result(record["job_id"])
            status.state = DONE_SKIPPED if outcome == SKIPPED else DONE
        except Exception as e:  # noqa: BLE001 - submitit re-raises the job's exception with its traceback as text
            lines = [line for line in str(e).splitlines() if line.strip()]
            status.state, status.error = FAILED, f"SLURM job {record['job_id']}: {lines[-1] if lines else e}"
        console.print(f"{status.job.name}: {status.state}" + (f": {status.error}" if status.error else ""))

    def queue(self) -> dict[str, str]:
        """The jobs in SLURM's queue (``queued_jobs``); a seam for tests."""
        return queued_jobs()

    def has_result(self, job_id: str) -> bool:
        """submitit wrote the job's result (its return value or its exception)."""
        import submitit

        return submitit.SlurmJob(self.folder / "%j", job_id).paths.result_pickle.exists()

    def result(self, job_id: str) -> str:
        """What the job's ``run_job`` returned; raises what it raised (submitit's ``FailedJobError``)."""
        import submitit

        return submitit.SlurmJob(self.folder / "%j", job_id).result()

    def submit(self, job: TrainingJob) -> str:
        """Submit ``job`` to SLURM; returns its job id."""
        return self.executor().submit(run_job, job, self.env, self.device, job.log_path(self.output_dir)).job_id

    def executor(self):
        """submitit's executor with the settings' sbatch options (made once)."""
        import submitit

        if self._executor is None:
            s = self.settings
            self._executor = submitit.SlurmExecutor(folder=self.folder / "%j")
            self._executor.update_parameters(
                job_name="nnunetv2_llm-h2h", time=s.time, partition=s.partition, mem=s.mem,
                gpus_per_node=s.gpus_per_job or None, additional_parameters=sbatch_options(s.extra) or None)
        return self._executor

    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.records_file.read_text()) if self.records_file.is_file() else {}
        except ValueError as e:
            raise LLMSettingError(f"{self.records_file} is unreadable ({e}); remove it to submit again (jobs still "
                                  "in the queue would then run twice)", "-o") from None

    def _save(self, records: dict[str, dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.records_file, "w") as f:
            f.write(json.dumps(records, indent=1))
