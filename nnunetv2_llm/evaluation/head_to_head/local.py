"""``--launcher local``: up to ``--jobs`` trainings at once on this machine, each on its own GPU (round-robin over
``--gpus``) or on the CPU, with a live view of what is queued, running, done or failed and where each log is."""

from __future__ import annotations

import queue
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_llm.common.nnunet_commands import NnUNetCommandError
from nnunetv2_llm.evaluation.head_to_head.matrix import TrainingJob
from nnunetv2_llm.evaluation.head_to_head.runner import SKIPPED, run_job

QUEUED, WAITING, RUNNING, DONE, FAILED = "queued", "waiting for its lock", "running", "done", "failed"
DONE_SKIPPED = "done, skipped"  # finished before this head-to-head: never retrained


@dataclass
class JobStatus:
    """What a job is doing (``state``, one of the constants above), where, since when and where its log is."""

    job: TrainingJob
    log: Path
    state: str = QUEUED
    gpu: str | None = None
    command: str = ""
    started: float | None = None
    ended: float | None = None
    error: str = field(default="", repr=False)

    def elapsed(self) -> str:
        """Minutes and seconds since the job started (to its end, once ended); empty before it started."""
        if self.started is None:
            return ""
        seconds = int((self.ended or time.monotonic()) - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"


def gpu_slots(gpus: Sequence[str] | None, jobs: int) -> list[str | None]:
    """The GPU of each of the ``jobs`` parallel slots: round-robin over ``gpus``; None (no
    ``CUDA_VISIBLE_DEVICES`` set) without ``gpus``."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(jobs)]


def render(statuses: Sequence[JobStatus]):
    """A rich table of the jobs: state, GPU, elapsed time, log (SLURM's own states in cyan, like running)."""
    from rich.table import Table

    colours = {QUEUED: "dim", WAITING: "yellow", RUNNING: "cyan", DONE: "green", DONE_SKIPPED: "green",
               FAILED: "bold red"}
    counts = Counter(s.state for s in statuses)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    table = Table(title=f"head-to-head: {len(statuses)} trainings ({summary})", title_justify="left")
    for column in ("training", "state", "GPU", "time", "log"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        state = f"[{colours.get(s.state, 'cyan')}]{s.state}[/]"
        table.add_row(s.job.name, state, s.gpu or "-", s.elapsed(), str(s.log))
    return table


class LocalLauncher:
    """Runs the jobs in ``jobs`` parallel slots; ``run`` returns when all have ended (failures do not stop the
    others: their trainings are independent)."""

    def __init__(self, env: dict[str, str], device: str, output_dir: Path, jobs: int = 1,
                 gpus: Sequence[str] | None = None) -> None:
        self.env, self.device, self.output_dir = env, device, Path(output_dir)
        self.slots: queue.Queue[str | None] = queue.Queue()
        for gpu in gpu_slots(gpus, jobs):
            self.slots.put(gpu)
        self.jobs = jobs

    def run(self, jobs: Sequence[TrainingJob]) -> list[JobStatus]:
        """Run ``jobs`` with a live view on stderr; returns their final statuses in ``jobs``' order."""
        from rich.console import Console
        from rich.live import Live

        console = Console(stderr=True)
        statuses = [JobStatus(job, job.log_path(self.output_dir)) for job in jobs]
        with Live(render(statuses), console=console, refresh_per_second=1) as live:
            def update(status: JobStatus, state: str) -> None:
                status.state = state
                live.update(render(statuses))
                detail = f": {status.error}" if state == FAILED else f" (log: {status.log})"
                console.print(f"{status.job.name}: {state}{detail if state in (RUNNING, FAILED) else ''}")

            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                for future in [pool.submit(self._run_one, status, update) for status in statuses]:
                    future.result()
            live.update(render(statuses))
        return statuses

    def _run_one(self, status: JobStatus, update) -> None:
        gpu = self.slots.get()
        try:
            status.gpu = gpu
            env = {**self.env, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}

            def started(command: list[str]) -> None:
                status.started, status.command = time.monotonic(), " ".join(command)
                update(status, RUNNING)

            outcome = run_job(status.job, env, self.device, status.log, on_wait=lambda: update(status, WAITING),
                              on_start=started)
            status.ended = time.monotonic()
            update(status, DONE_SKIPPED if outcome == SKIPPED else DONE)
        except (NnUNetCommandError, OSError) as e:
            status.ended, status.error = time.monotonic(), str(e)
            update(status, FAILED)
        finally:
            self.slots.put(gpu)
