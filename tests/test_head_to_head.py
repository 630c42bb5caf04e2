"""head-to-head and sweep-layers end to end on the real Hippocampus subset, and their resume logic."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from nnunetv2_llm.common import nnunet_commands
from nnunetv2_llm.common.nnunet_commands import nnunet_command, nnunet_dataset_id, trainer_fold_dir

BASELINE, LLM = "nnUNetTrainer_1epoch_2iters", "nnUNetTrainerLLM_1epoch_2iters"


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([nnunet_command("nnunetv2_llm"), *args], env={**os.environ, **env},
                          capture_output=True, text=True)


def test_head_to_head_trains_compares_and_never_retrains(nnunet_workdir, tmp_path):
    args = ["head-to-head", "-d", "4", "-c", "3d_fullres", "-tr", BASELINE, LLM, "-f", "0",
            "-o", str(tmp_path / "report"), "--device", "cpu", "--jobs", "2"]
    first = cli(args, nnunet_workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    for trainer in (BASELINE, LLM):  # both trained by the local launcher, each with its own log
        log = (tmp_path / "report" / "logs" / f"Dataset004_{trainer}_f0.log").read_text()
        assert log.startswith(f"$ nnUNetv2_train 4 3d_fullres 0 -tr {trainer} -p nnUNetPlans -device cpu\n")
        assert "Training done." in log
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"Reference trainer: `{BASELINE}`" in report and "Wilcoxon" in report
    metrics = pd.read_csv(tmp_path / "report" / "per_case_metrics.csv")
    assert set(metrics["trainer"]) == {BASELINE, LLM}
    assert len(metrics) == 2 * 3 * 2  # trainers x validation cases of fold 0 x foreground classes
    assert metrics[["dice", "nsd", "hd95"]].notna().all().all()
    assert (tmp_path / "report" / "paired_differences.png").stat().st_size > 0

    checkpoints = {t: trainer_fold_dir(nnunet_workdir, 4, "3d_fullres", t, "0") / "checkpoint_final.pth"
                   for t in (BASELINE, LLM)}
    before = {t: p.stat().st_mtime_ns for t, p in checkpoints.items()}
    refused = cli(args, nnunet_workdir)  # the report is there: refused before anything runs
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    second = cli([*args, "--overwrite"], nnunet_workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "done, skipped" in second.stderr
    assert {t: p.stat().st_mtime_ns for t, p in checkpoints.items()} == before


@pytest.mark.parametrize("files,expected", [
    ((), [None]),                                                  # fresh: plain training
    (("checkpoint_latest.pth",), ["--c"]),                         # interrupted: continue
    (("checkpoint_final.pth",), ["--val"]),                        # finished, no validation: validate only
    (("checkpoint_final.pth", "validation/summary.json"), []),     # finished: nothing
])
def test_ensure_trained_resumes_and_never_retrains(tmp_path, monkeypatch, files, expected):
    env = {"nnUNet_results": str(tmp_path)}
    fold = tmp_path / "Dataset004_X" / "T__nnUNetPlans__3d_fullres" / "fold_0"
    for name in files:
        (fold / name).parent.mkdir(parents=True, exist_ok=True)
        (fold / name).touch()
    (tmp_path / "Dataset004_X").mkdir(exist_ok=True)
    calls = []
    monkeypatch.setattr(nnunet_commands, "run", lambda args, env: calls.append(args))
    nnunet_commands.ensure_trained(4, "3d_fullres", "T", "0", env, "cpu")
    assert [c[-1] if c[-1].startswith("--") else None for c in calls] == expected


def test_dataset_ids():
    assert nnunet_dataset_id("Dataset004_Hippocampus") == nnunet_dataset_id("4") == nnunet_dataset_id(4) == 4


def test_cli_errors_are_one_line(tmp_path):
    result = cli(["head-to-head", "-d", "4", "-tr", BASELINE, LLM, "-o", str(tmp_path)],
                 {"nnUNet_raw": "", "nnUNet_preprocessed": "", "nnUNet_results": ""})
    assert result.returncode == 2
    assert "nnUNet_raw" in result.stderr and "Traceback" not in result.stderr


def test_sweep_layers_reports_dice_per_layer(nnunet_workdir, tmp_path):
    result = cli(["sweep-layers", "-d", "4", "-c", "3d_fullres", "-tr", LLM, "--layers", "0", "29", "-f", "0",
                  "-o", str(tmp_path / "sweep"), "--device", "cpu"], nnunet_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "sweep" / "per_case_metrics.csv")
    assert set(metrics["trainer"]) == {f"{LLM}_layer0", f"{LLM}_layer29"}
    assert (tmp_path / "sweep" / "dice_per_layer.png").stat().st_size > 0
    assert "Dice per layer" in (tmp_path / "sweep" / "report.md").read_text()
    assert Path(tmp_path / "sweep" / "layer_0").is_dir()
