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
