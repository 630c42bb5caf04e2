"""Commands that run for minutes or hours check their inputs first: a bad dataset, trainer name, layer index or
output path is one line on stderr (exit 2) before any preprocessing, training, measurement or model run."""

from __future__ import annotations

import os

import pytest
from test_bad_inputs import cli_error
from test_benchmark import DATASET, make_tiny_preprocessed

from nnunetv2_llm import cli
from nnunetv2_llm.evaluation import head_to_head, sweep_layers
from nnunetv2_llm.tools import benchmark
from nnunetv2_llm.tools.activation_maps import cli as activation_maps


class Reached(Exception):
    """Raised by a stand-in for the expensive step: the inputs passed the checks."""


def must_not_run(what: str):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} ran before the inputs were checked")
    return fail


def reached(*args, **kwargs):
    raise Reached






def test_head_to_head_checks_every_trainer_before_preparing_or_training(capsys, nnunet_folders, monkeypatch):
    monkeypatch.setattr(head_to_head, "prepare_dataset", must_not_run("dataset preparation"))
    monkeypatch.setattr(head_to_head, "train_all", must_not_run("training"))
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", "nnUNetTrainer", "nnUNetTrainerLLM",
                     "nnUNetTrainerLLMNoLMM", "-o", str(nnunet_folders / "out"))
    assert "no nnU-Net trainer class named nnUNetTrainerLLMNoLMM (" in line and line.endswith("(fix: -tr)")


def test_prepare_dataset_checks_the_paths_of_dataset_json_once(nnunet_folders, monkeypatch):
    from nnunetv2_llm.common import dataset_checks

    raw = nnunet_folders / "nnUNet_raw" / "Dataset004_Tiny"
    for name in ("imagesTr/case_0000.nii.gz", "labelsTr/case.nii.gz"):
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).touch()
    (raw / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}, '
                                      '"numTraining": 1, "file_ending": ".nii.gz"}')
    calls = []
    check = dataset_checks.check_dataset_json_paths
    monkeypatch.setattr(dataset_checks, "check_dataset_json_paths",
                        lambda folder: calls.append(folder) or check(folder))
    monkeypatch.setattr(head_to_head, "ensure_preprocessed", lambda *args: None)
    head_to_head.prepare_dataset(4, "3d_fullres", "nnUNetPlans", {"nnUNet_raw": str(nnunet_folders / "nnUNet_raw")})
    assert calls == [raw]


def test_sweep_layers_checks_layers_and_trainers_before_preparing_or_training(capsys, nnunet_folders, monkeypatch,
                                                                            three_layer_llama):
    monkeypatch.setattr(sweep_layers, "prepare_dataset", must_not_run("dataset preparation"))
    monkeypatch.setattr(sweep_layers, "train_all", must_not_run("training"))
    base = ["sweep-layers", "-d", "4", "-o", str(nnunet_folders / "out")]
    args = [*base, "--llm-source", str(three_layer_llama)]
    line = cli_error(capsys, *args, "--layers", "0", "99")
    assert "layer index 99 is out of range: the model has 3 layers (0..2)" in line and line.endswith("(fix: --layers)")
    line = cli_error(capsys, *args, "--layers", "0", "2:2")
    assert "layer range 2:2 selects no layer" in line and line.endswith("(fix: --layers)")
    line = cli_error(capsys, *args, "--layers", "0", "2", "-tr", "nnUNetTrainerLLM_50epoch")
    assert "named nnUNetTrainerLLM_50epoch (" in line and line.endswith("(fix: -tr)")
    line = cli_error(capsys, *args, "--layers", "1", "--reference", "nnUNetTrainerNoLLM_50epochs")
    assert "named nnUNetTrainerNoLLM_50epochs (" in line and line.endswith("(fix: --reference)")
    monkeypatch.setenv("nnUNet_LLM_SOURCE", str(three_layer_llama))  # the source the trainer would read
    line = cli_error(capsys, *base, "--layers", "-4", "1")
    assert "layer index -4 is out of range" in line


@pytest.fixture
def restored_environ():
    """``benchmark`` sets nnU-Net's variables in this process; put them back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_benchmark_checks_dataset_and_trainers_before_measuring(capsys, tmp_path, monkeypatch, restored_environ):
    preprocessed = make_tiny_preprocessed(tmp_path / "preprocessed")
    monkeypatch.setattr(benchmark, "measure_memory", must_not_run("the memory measurement"))
    monkeypatch.setattr(benchmark, "build_trainer", must_not_run("building a trainer"))
    args = ["benchmark", "--preprocessed", str(preprocessed), "--device", "cpu", "--output", str(tmp_path / "out")]
    line = cli_error(capsys, *args, "-d", "Hippo")
    assert "dataset 'Hippo' is neither an id nor a DatasetXXX_Name" in line and line.endswith("(fix: -d)")
    line = cli_error(capsys, *args, "-d", "991")
    assert "Dataset991_* in" in line and "run nnUNetv2_plan_and_preprocess -d 991 -c 3d_fullres" in line
    line = cli_error(capsys, *args, "-d", "990", "-c", "2d")
    assert "not preprocessed for nnUNetPlans 2d" in line
    line = cli_error(capsys, *args, "-d", "990", "-tr", "nnUNetTrainer", "nnUNetTrainerLMM")
    assert "no nnU-Net trainer class named nnUNetTrainerLMM (" in line and line.endswith("(fix: -tr)")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(benchmark, "run_benchmark", reached)
    for dataset in ("990", DATASET):  # valid inputs pass
        with pytest.raises(Reached):
            cli.main([*args, "-d", dataset])


def test_activation_maps_checks_the_output_paths_before_running_the_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(activation_maps, "compute_activation_maps", must_not_run("the model"))
    blocker = tmp_path / "a_file"
    blocker.touch()
    args = ["activation-maps", "-m", str(tmp_path / "model"), "-i", str(tmp_path / "case_0000.nii.gz")]
    line = cli_error(capsys, *args, "-o", str(tmp_path / "act.xyz"))
    assert "cannot write a figure to" in line and ".png" in line and line.endswith("(fix: -o)")
    line = cli_error(capsys, *args, "-o", str(blocker / "act.png"))
    assert f"cannot create the folder of {blocker / 'act.png'}" in line and line.endswith("(fix: -o)")
    line = cli_error(capsys, *args, "-o", str(tmp_path / "act.png"), "--save-arrays", str(blocker / "a.npz"))
    assert line.endswith("(fix: --save-arrays)")
    monkeypatch.setattr(activation_maps, "compute_activation_maps", reached)
    with pytest.raises(Reached):  # a missing folder is created, as the other commands do
        cli.main([*args, "-o", str(tmp_path / "new" / "act.PDF")])
    assert (tmp_path / "new").is_dir()

