"""``nnunetv2_llm benchmark`` checks its counts, fold, device and LLM choice before the first measurement."""

from __future__ import annotations

import pytest
import torch
from test_bad_inputs import cli_error
from test_benchmark import DATASET, make_tiny_preprocessed
from test_cli_errors import Reached, must_not_run, reached, restored_environ  # noqa: F401 (a fixture)

from nnunetv2_llm import cli
from nnunetv2_llm.llm import synthetic as synthetic_llm
from nnunetv2_llm.tools import benchmark


@pytest.fixture
def bench_args(tmp_path, monkeypatch, restored_environ) -> list[str]:  # noqa: F811
    """The benchmark's command line on a tiny preprocessed dataset; measuring anything fails the test."""
    preprocessed = make_tiny_preprocessed(tmp_path / "preprocessed")
    for name in ("measure_memory", "build_trainer", "run_benchmark"):
        monkeypatch.setattr(benchmark, name, must_not_run(name))
    for name in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER"):
        monkeypatch.delenv(name, raising=False)
    return ["benchmark", "-d", DATASET, "--preprocessed", str(preprocessed), "--device", "cpu",
            "--output", str(tmp_path / "out")]


@pytest.mark.parametrize("flag,value,minimum", [
    ("--batches", "0", 1), ("--iterations", "0", 1), ("--warmup", "-1", 0), ("--inference-cases", "-1", 0),
    ("--inference-repeats", "-2", 0), ("--memory-steps", "-1", 0),
])
def test_counts_out_of_range_are_refused(capsys, bench_args, flag, value, minimum):
    line = cli_error(capsys, *bench_args, flag, value)
    assert f"{flag} must be at least {minimum}, got {value}" in line and line.endswith(f"(fix: {flag})")


def test_a_fold_outside_the_split_is_refused(capsys, bench_args):
    line = cli_error(capsys, *bench_args, "-f", "9")
    assert "fold 9 is not in the dataset's 5-fold split" in line and line.endswith("(fix: -f)")


def test_an_unavailable_device_is_refused(capsys, bench_args, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, *[a if a != "cpu" else "cuda" for a in bench_args])
    assert "torch sees no CUDA device" in line and line.endswith("(fix: --device)")


def test_the_llm_choice_is_resolved_before_the_first_measurement(capsys, tmp_path, bench_args, monkeypatch):
    missing = tmp_path / "no_such_model"
    line = cli_error(capsys, *bench_args, "-tr", "nnUNetTrainer", "nnUNetTrainerLLMNoLLM", "--llm-source", str(missing))
    assert "does not exist" in line and line.endswith("(fix: --llm-source)")
    source = synthetic_llm.write_synthetic_checkpoint(tmp_path / "tiny", "tiny-llama")  # 2 layers
    line = cli_error(capsys, *bench_args, "--llm-source", str(source), "--llm-layer", "5")
    assert "layer index 5 is out of range" in line and line.endswith("(fix: --llm-layer)")
    monkeypatch.setattr(benchmark, "run_benchmark", reached)
    with pytest.raises(Reached):  # no LLM trainer: the source is not read
        cli.main([*bench_args, "-tr", "nnUNetTrainer", "--llm-source", str(missing)])
    with pytest.raises(Reached):
        cli.main([*bench_args, "--llm-source", str(source), "--llm-layer", "-1"])


@pytest.mark.parametrize("extra,message,setting", [
    (["--plan-preset", "large_2d"], "give either a dataset (-d) or --plan-preset", "-d / --plan-preset"),  # both
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0", "--batch-size"),
])
def test_plan_source_settings_are_checked(capsys, bench_args, extra, message, setting):
    line = cli_error(capsys, *bench_args, *extra)
    assert message in line and line.endswith(f"(fix: {setting})")


def test_a_plan_preset_needs_no_dataset(capsys, bench_args, monkeypatch):
    without_dataset = [a for a in bench_args if a not in ("-d", DATASET)]
    line = cli_error(capsys, *without_dataset)
    assert "give either a dataset (-d) or --plan-preset" in line
    line = cli_error(capsys, *without_dataset, "--plan-preset", "large_2d", "-c", "3d_fullres")
    assert "--plan-preset large_2d plans 2d, not 3d_fullres" in line and line.endswith("(fix: -c)")
    seen = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda args: seen.update(vars(args)) or reached())
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    preprocessed_at = without_dataset.index("--preprocessed")
    del without_dataset[preprocessed_at:preprocessed_at + 2]
    with pytest.raises(Reached):
        cli.main([*without_dataset, "--plan-preset", "large_2d", "-tr", "nnUNetTrainer"])
    assert seen["configuration"] == "2d" and seen["synthetic_batches"] and seen["inference_cases"] == 0
