"""``nnunetv2_llm predict``: the device is checked before anything is written, a model or dataset folder is never
taken as the output folder, and nnU-Net gets the dataset folder's real name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import cli_error, predict_args
from test_cli_errors import Reached, reached

from nnunetv2_llm import cli
from nnunetv2_llm.common import nnunet_commands

TRAINER = "nnUNetTrainerLLM_1epoch_2iters"


@pytest.fixture
def model_folder(tmp_path, monkeypatch) -> Path:
    """A trained-looking model folder (no LLM block in its plans) for dataset 4 under $nnUNet_results."""
    folder = tmp_path / "results" / "Dataset004_Hippocampus" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}))
    torch.save({"network_weights": {}}, folder / "fold_0" / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return folder


def test_an_unavailable_device_is_refused_before_anything_is_written(capsys, tmp_path, image_folder, model_folder,
                                                                     monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nnunet_commands, "run", reached)
    argv = [arg if arg != "cpu" else "cuda" for arg in predict_args(image_folder, tmp_path / "out")]
    line = cli_error(capsys, *argv)
    assert "device 'cuda' was requested, but torch sees no CUDA device" in line and line.endswith("(fix: -device)")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Reached):
        cli.main(argv)


@pytest.mark.parametrize("found", ["dataset.json", "plans.json"])
def test_a_model_or_dataset_folder_is_never_the_output(capsys, tmp_path, image_folder, model_folder, monkeypatch,
                                                       found):
    monkeypatch.setattr(nnunet_commands, "run", reached)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(model_folder / found, out / found)
    for extra in ([], ["--overwrite"]):
        line = cli_error(capsys, *predict_args(image_folder, out, *extra))
        assert f"holds {found} but is no earlier prediction" in line and line.endswith("(fix: -o)")
    (out / "predict_from_raw_data_args.json").write_text("{}")  # an earlier nnUNetv2_predict output: allowed
    with pytest.raises(Reached):
        cli.main(predict_args(image_folder, out))


@pytest.mark.parametrize("dataset", ["4", "Dataset004", "Dataset004_Hippocampus"])
def test_nnunet_gets_the_dataset_folders_name(tmp_path, image_folder, model_folder, monkeypatch, dataset):
    commands = []
    monkeypatch.setattr(nnunet_commands, "run", lambda args, env: commands.append(args))
    argv = predict_args(image_folder, tmp_path / "out")
    argv[argv.index("-d") + 1] = dataset
    assert cli.main(argv) == 0
    command = commands[0]
    assert command[command.index("-d") + 1] == "Dataset004_Hippocampus"


def test_several_trained_datasets_with_one_id_are_refused(capsys, tmp_path, image_folder, model_folder):
    (model_folder.parents[1] / "Dataset004_Other").mkdir()
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out"))
    assert "dataset id 4 matches 2 folders" in line and line.endswith("(fix: -d)")
