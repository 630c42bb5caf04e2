"""head-to-head's job matrix, its local launcher (parallel slots, GPUs round-robin, failures), the per-fold lock
between two processes, and its launch errors; nnU-Net's training is a stand-in script here (the real one runs in
test_head_to_head.py)."""

from __future__ import annotations

import json
import multiprocessing
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_bad_inputs import cli_error

from nnunetv2_llm.evaluation.head_to_head import local, runner
from nnunetv2_llm.evaluation.head_to_head.local import DONE, DONE_SKIPPED, FAILED, LocalLauncher, gpu_slots
from nnunetv2_llm.evaluation.head_to_head.matrix import TrainingJob, job_matrix

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerLLM"]

# Stands in for nnUNetv2_train: records when it ran and on which GPU, sleeps, then writes what a finished fold
# holds (or fails, for a trainer named *Broken*).
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    dataset, conf, fold = sys.argv[1:4]
    trainer, plans = sys.argv[sys.argv.index("-tr") + 1], sys.argv[sys.argv.index("-p") + 1]
    start = time.time()
    time.sleep(float(os.environ.get("FAKE_TRAIN_S", "0.5")))
    with open(os.environ["FAKE_TRAIN_RECORD"], "a") as f:
        f.write(json.dumps({"trainer": trainer, "fold": fold, "args": sys.argv[1:], "start": start,
                            "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    if "Broken" in trainer:
        sys.exit(3)
    fold_dir = Path(os.environ["nnUNet_results"]) / "Dataset004_Fake" / f"{trainer}__{plans}__{conf}" / f"fold_{fold}"
    (fold_dir / "validation").mkdir(parents=True, exist_ok=True)
    (fold_dir / "checkpoint_final.pth").touch()
    (fold_dir / "validation" / "summary.json").write_text("{}")
""")


@pytest.fixture
def fake_nnunet(tmp_path, monkeypatch) -> dict[str, str]:
    """nnU-Net folders with a raw Dataset004_Fake, and ``nnUNetv2_train`` replaced by ``FAKE_TRAIN``."""
    env = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    (tmp_path / "nnUNet_raw" / "Dataset004_Fake").mkdir(parents=True)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    env["FAKE_TRAIN_RECORD"] = str(tmp_path / "record.jsonl")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shim = fake_command(script)
    monkeypatch.setattr(runner, "nnunet_command", lambda name: shim)
    return env


def fake_command(script: Path) -> str:
    """An executable shim that runs ``script`` with this Python (``run_job`` calls ``[command, *args]``)."""
    shim = script.with_suffix(".sh")
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    shim.chmod(0o755)
    return str(shim)


def records(env: dict[str, str]) -> list[dict]:
    path = Path(env["FAKE_TRAIN_RECORD"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_matrix_has_every_dataset_trainer_seed_and_fold_once():
    jobs = job_matrix([4, 27], "3d_fullres", TRAINERS, [0, 1], seeds=[0, 1, 2])
    assert len(jobs) == 2 * 2 * 3 * 2 == len(set(jobs))
    assert jobs[0] == TrainingJob(4, "3d_fullres", "nnUNetTrainer_seed0", "0")
    assert {j.trainer for j in jobs} == {f"{t}_seed{k}" for t in TRAINERS for k in range(3)}
    assert [j.fold for j in jobs[:6]] == ["0"] * 6  # fold by fold: early folds of every trainer come first
    assert [j.trainer for j in job_matrix([4], "2d", TRAINERS, [0])] == TRAINERS
    assert jobs[0].log_path(Path("out")) == Path("out/logs/Dataset004_nnUNetTrainer_seed0_f0.log")


def test_gpu_slots_are_round_robin():
    assert gpu_slots(("0", "1"), 4) == ["0", "1", "0", "1"]
    assert gpu_slots(None, 2) == [None, None]


def test_local_launcher_runs_jobs_in_parallel_on_their_gpus_and_reports_failures(fake_nnunet, tmp_path):
    jobs = job_matrix([4], "3d_fullres", ["A", "B", "BrokenC", "D"], [0])
    statuses = LocalLauncher(fake_nnunet, "cuda", tmp_path / "out", jobs=2, gpus=("0", "1")).run(jobs)
    assert [s.state for s in statuses] == [DONE, DONE, FAILED, DONE]
    assert "exit code 3" in statuses[2].error and str(statuses[2].log) in statuses[2].error
    ran = {r["trainer"]: r for r in records(fake_nnunet)}
    assert {r["gpu"] for r in ran.values()} == {"0", "1"}
    assert ran["A"]["start"] < ran["B"]["end"] and ran["B"]["start"] < ran["A"]["end"]  # two at once
    assert all(r["args"][-2:] == ["-device", "cuda"] for r in ran.values())
    assert "$ nnUNetv2_train 4 3d_fullres 0 -tr A" in statuses[0].log.read_text()

    again = LocalLauncher(fake_nnunet, "cuda", tmp_path / "out", jobs=2).run(jobs)  # finished: never rerun
    assert [s.state for s in again] == [DONE_SKIPPED, DONE_SKIPPED, FAILED, DONE_SKIPPED]
    assert len(records(fake_nnunet)) == 4 + 1


def _train_in_another_process(env: dict[str, str], job: TrainingJob, log: str, result_file: str) -> None:
    """A head-to-head's worker: the fold through ``run_job`` (forked: the fake nnU-Net is inherited)."""
    waited = []
    outcome = runner.run_job(job, env, "cpu", Path(log), on_wait=lambda: waited.append(True))
    Path(result_file).write_text(json.dumps({"outcome": outcome, "waited": bool(waited)}))


def test_two_processes_never_train_the_same_fold_at_once(fake_nnunet, tmp_path):
    job = TrainingJob(4, "3d_fullres", "A", "0")
    env = {**fake_nnunet, "FAKE_TRAIN_S": "2"}
    context = multiprocessing.get_context("fork")  # inherits the fake nnU-Net
    workers = [context.Process(target=_train_in_another_process,
                               args=(env, job, str(tmp_path / f"{i}.log"), str(tmp_path / f"{i}.json")))
               for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    outcomes = sorted((json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)),
                      key=lambda o: o["outcome"])
    assert outcomes == [{"outcome": "skipped", "waited": True}, {"outcome": "trained", "waited": False}]
    assert len(records(fake_nnunet)) == 1  # trained once; the other waited, then found the fold finished
    assert runner.fold_lock_path(job, fake_nnunet).name == "fold_0.lock"


@pytest.mark.parametrize("args,message,setting", [
    (["--launcher", "pbs"], "unknown launcher 'pbs'", "--launcher"),
    (["--jobs", "0"], "--jobs must be at least 1", "--jobs"),
    (["--gpus", "0,1", "--device", "cpu"], "--gpus chooses CUDA devices", "--gpus / --device"),
    (["--launcher", "slurm", "--gpus", "0"], "--gpus is for --launcher local", "--gpus"),
    (["--seeds", "1", "1"], "seeds must be distinct", "--seeds"),
    (["--no-wait"], "--no-wait is for --launcher slurm", "--no-wait"),
])
def test_launch_errors_are_one_line_before_anything_runs(capsys, nnunet_folders, args, message, setting):
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", *TRAINERS, "-o", str(nnunet_folders / "out"), *args)
    assert message in line and line.endswith(f"(fix: {setting})")


def test_slurm_launcher_without_sbatch_is_one_line(capsys, nnunet_folders, monkeypatch):
    monkeypatch.setenv("PATH", str(nnunet_folders))
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", *TRAINERS, "-o", str(nnunet_folders / "out"),
                     "--launcher", "slurm", "--device", "cpu")
    assert "needs SLURM's sbatch and squeue" in line and line.endswith("(fix: --launcher)")


def test_local_launcher_view_names_each_log(fake_nnunet, tmp_path):
    jobs = job_matrix([4], "3d_fullres", ["A"], [0])
    statuses = LocalLauncher(fake_nnunet, "cpu", tmp_path / "out").run(jobs)
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(local.render(statuses))
    text = console.export_text()
    assert "1 done" in text and str(tmp_path / "out" / "logs" / "Dataset004_A_f0.log") in text


def test_gpu_check_dry_run_prints_valid_commands_and_runs_nothing(tmp_path):
    from nnunetv2_llm.cli import COMMANDS, build_parser

    out = tmp_path / "gpu_check"
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), "--dry-run", "--out", str(out), "--folds", "0 1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not out.exists()  # nothing ran, nothing was written
    steps = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [s.split(",")[0][1:] for s in steps] == ["convert", "preprocess", "benchmark_eager", "benchmark_compile",
                                                   "head_to_head"]
    assert sum(int(s.split("at most ")[1].split(" s]")[0]) for s in steps) < 9 * 60
    for line in steps[2:]:  # the package's own commands parse with its CLI
        words = shlex.split(line.split("] ", 1)[1])
        words = words[words.index(next(w for w in words if w.endswith("nnunetv2_llm"))) + 1:]
        args = build_parser({words[0]: COMMANDS[words[0]]}).parse_args(words)
        assert args.device == "cuda"
    h2h = args
    assert h2h.folds == [0, 1] and h2h.jobs == 4 and h2h.gpus == "0" and len(h2h.trainers) == 4
    assert all(t.endswith("_20epochs_50iters") for t in h2h.trainers)
