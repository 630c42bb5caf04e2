"""head-to-head's SLURM launcher: sbatch options, the follow-up logic (collect, resubmit what the scheduler killed,
give up after --max-resubmits) with a stand-in queue, and a tiny head-to-head through a real one-node SLURM on
localhost (Debian's slurm-wlm and munge, installed with apt-get when absent; skipped, saying why, where they cannot
be installed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from test_head_to_head import BASELINE, LLM, cli

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.evaluation.head_to_head.local import DONE, DONE_SKIPPED, FAILED, QUEUED
from nnunetv2_llm.evaluation.head_to_head.matrix import job_matrix
from nnunetv2_llm.evaluation.head_to_head.slurm import SlurmLauncher, SlurmSettings, sbatch_options


def test_sbatch_options():
    assert sbatch_options("--account=abc --qos high --exclusive") == {"account": "abc", "qos": "high",
                                                                     "exclusive": True}
    assert sbatch_options("") == {}
    with pytest.raises(LLMSettingError, match="not a long sbatch option"):
        sbatch_options("-A abc")


class FakeSlurm(SlurmLauncher):
    """A queue where each job stays one look, then ends: with a result, or (trainers named Killed*) without one,
    as after a time limit or a preemption."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list[str] = []
        self.looks_left: dict[str, int] = {}
        self.results: dict[str, str] = {}

    def submit(self, job) -> str:
        job_id = str(len(self.submitted) + 1)
        self.submitted.append(job.trainer)
        self.looks_left[job_id] = 1
        return job_id

    def queue(self) -> dict[str, str]:
        alive = {}
        for job_id, left in self.looks_left.items():
            if left > 0:
                alive[job_id] = "RUNNING"
                self.looks_left[job_id] -= 1
            elif not self.submitted[int(job_id) - 1].startswith("Killed"):
                self.results[job_id] = "trained"
        return alive

    def has_result(self, job_id: str) -> bool:
        return job_id in self.results

    def result(self, job_id: str) -> str:
        return self.results[job_id]


def test_killed_jobs_are_resubmitted_then_given_up_and_no_wait_is_collected_later(tmp_path):
    env = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    jobs = job_matrix([4], "3d_fullres", ["A", "KilledB"], [0])
    settings = SlurmSettings(max_resubmits=2, poll_s=0)
    statuses = FakeSlurm(env, "cpu", tmp_path / "out", settings).run(jobs)
    assert [s.state for s in statuses] == [DONE, FAILED]
    assert "killed by the scheduler 3 times" in statuses[1].error
    assert json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text()) == {}

    no_wait = SlurmSettings(wait=False, poll_s=0)
    first = FakeSlurm(env, "cpu", tmp_path / "later", no_wait)
    assert [s.state for s in first.run(jobs[:1])] == [QUEUED]
    collector = FakeSlurm(env, "cpu", tmp_path / "later", SlurmSettings(poll_s=0))
    collector.looks_left, collector.submitted = first.looks_left, first.submitted
    assert [s.state for s in collector.run(jobs[:1])] == [DONE]
    assert collector.submitted == ["A"]  # collected, not submitted again


# ------------------------------------------------------------------------------------- a real one-node SLURM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def install_slurm() -> str | None:
    """None when slurmctld, slurmd and munged are there (installed now if needed), else why not."""
    if all(shutil.which(name, path="/usr/sbin:/usr/bin") for name in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be (needs root and apt-get)"
    install = subprocess.run(["apt-get", "install", "-y", "slurm-wlm", "munge"], capture_output=True, text=True,
                             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return None if install.returncode == 0 else f"apt-get install slurm-wlm munge failed: {install.stderr[-300:]}"


def slurm_conf(folder: Path) -> Path:
    """One node (this host, all its CPUs) in one default partition; state, logs and PID files in ``folder``."""
    host = socket.gethostname().split(".")[0]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=h2htest", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "ReturnToService=2", "MpiDefault=none", "KillWait=5",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=h2h Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """``{"SLURM_CONF": ...}`` of a one-node cluster on localhost; the daemons this fixture started are stopped
    by their PIDs afterwards."""
    reason = install_slurm()
    if reason:
        print(f"SLURM test skipped: {reason}")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    conf = slurm_conf(folder)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    munge_pid = Path("/run/munge/munged.pid")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged answering yet
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        started.append(int(munge_pid.read_text()))
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], env=env, check=True)
        pid_file = folder / f"{daemon}.pid"
        wait_for(pid_file.is_file, 20, f"{daemon} did not write its PID file")
        started.append(int(pid_file.read_text()))
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                    text=True).stdout.strip() == "idle", 60, "the node did not become idle")
    yield {"SLURM_CONF": str(conf)}
    for pid in reversed(started):
        os.kill(pid, signal.SIGTERM)


def test_head_to_head_through_slurm_submits_collects_and_resubmits_a_killed_job(nnunet_workdir, slurm_cluster,
                                                                               tmp_path):
    env = {**nnunet_workdir, **slurm_cluster}
    out = tmp_path / "report"
    args = ["head-to-head", "-d", "4", "-c", "3d_fullres", "-tr", BASELINE, LLM, "-f", "1", "-o", str(out),
            "--device", "cpu", "--launcher", "slurm", "--slurm-gpus-per-job", "0", "--slurm-time", "60",
            "--slurm-mem", "3G",
            "--slurm-extra", "--cpus-per-task=1 --hold", "--no-wait"]  # held: cancelled below before it runs
    first = cli(args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run the same command again" in first.stdout
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    assert set(records) == {f"Dataset004_{t}_f1" for t in (BASELINE, LLM)}
    subprocess.run(["scancel", records[f"Dataset004_{BASELINE}_f1"]["job_id"]], env=env, check=True)

    outputs = []
    deadline = time.monotonic() + 600
    while not (out / "report.md").is_file():  # the identical call collects, resubmitting the cancelled job
        assert time.monotonic() < deadline, "\n".join(outputs)[-3000:]
        held = json.loads((out / "slurm" / "jobs.json").read_text())
        subprocess.run(["scontrol", "release", *(r["job_id"] for r in held.values())], env=env, capture_output=True)
        again = cli(args, env)
        assert again.returncode == 0, again.stderr[-3000:]
        outputs.append(again.stderr)
        time.sleep(5)
    assert "resubmitted as" in "\n".join(outputs)
    metrics = pd.read_csv(out / "per_case_metrics.csv")
    assert set(metrics["trainer"]) == {BASELINE, LLM} and metrics["dice"].notna().all()
    assert "Training done." in (out / "logs" / f"Dataset004_{LLM}_f1.log").read_text()

    rerun = cli([a for a in args if a != "--no-wait"] + ["--overwrite"], env)  # finished: nothing submitted
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count(DONE_SKIPPED) >= 2 and "submitted as" not in rerun.stderr
