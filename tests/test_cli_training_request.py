"""Configuration, plans and folds are checked before anything is planned or trained; preprocessing counts as done only
when it is complete and made from the current raw dataset; several folders of one dataset id are an error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_benchmark import DATASET, make_tiny_preprocessed
from test_cli_errors import Reached, must_not_run, reached

from nnunetv2_llm.common import nnunet_commands
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import (
    check_training_request,
    dataset_folder,
    ensure_preprocessed,
    is_preprocessed,
)
from nnunetv2_llm.tools import demo

DATASET_ID = 990


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """nnU-Net folders: dataset 990 preprocessed for nnUNetPlans 3d_fullres (5 cases), and its raw dataset.json."""
    preprocessed = make_tiny_preprocessed(tmp_path / "nnUNet_preprocessed")
    raw = tmp_path / "nnUNet_raw" / DATASET
    raw.mkdir(parents=True)
    shutil.copy(preprocessed / DATASET / "dataset.json", raw / "dataset.json")
    return {"nnUNet_raw": str(tmp_path / "nnUNet_raw"), "nnUNet_preprocessed": str(preprocessed),
            "nnUNet_results": str(tmp_path / "nnUNet_results")}


def request_error(*args) -> LLMSettingError:
    with pytest.raises(LLMSettingError) as info:
        check_training_request(*args)
    return info.value


def test_a_configuration_missing_from_the_plans_is_refused(env):
    error = request_error(DATASET_ID, "2d", "nnUNetPlans", [0], env)
    assert "configuration '2d' is not in" in str(error) and "nnUNetPlans.json (3d_fullres)" in str(error)
    assert error.setting == "-c"
    assert request_error(DATASET_ID, "3d_fulres", "nnUNetPlans", [0], {**env, "nnUNet_preprocessed": "/nowhere"}) \
        .setting == "-c"  # not planned yet: only what nnU-Net's planner makes
    check_training_request(DATASET_ID, "3d_fullres", "nnUNetPlans", [0], env)


def test_plans_that_neither_exist_nor_can_be_planned_are_refused(env):
    error = request_error(DATASET_ID, "3d_fullres", "nnUNetPlanz", [0], env)
    assert "plans 'nnUNetPlanz' do not exist for dataset 990" in str(error) and error.setting == "-p"
    check_training_request(DATASET_ID, "3d_fullres", "nnUNetResEncUNetMPlans", [0], env)  # planned on demand


def test_folds_outside_the_split_are_refused(env):
    for fold in (5, 9, -1, "x"):
        error = request_error(DATASET_ID, "3d_fullres", "nnUNetPlans", [0, fold], env)
        assert f"fold {fold} is not in the dataset's 5-fold split" in str(error) and error.setting == "-f"
    check_training_request(DATASET_ID, "3d_fullres", "nnUNetPlans", [0, "4", "all"], env)
    splits = Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json"
    splits.write_text(json.dumps([{"train": [], "val": []}] * 3))
    assert "3-fold split: use 0..2" in str(request_error(DATASET_ID, "3d_fullres", "nnUNetPlans", [3], env))


def test_interrupted_or_stale_preprocessing_is_not_done(env):
    folder = Path(env["nnUNet_preprocessed"]) / DATASET
    raw = Path(env["nnUNet_raw"]) / DATASET
    assert is_preprocessed(folder, "3d_fullres", "nnUNetPlans", raw)
    last_case = folder / "nnUNetPlans_3d_fullres" / "case_004.pkl"
    properties = last_case.read_bytes()
    last_case.unlink()  # interrupted: nnU-Net creates the folder first and writes each case's .pkl last
    assert not is_preprocessed(folder, "3d_fullres", "nnUNetPlans", raw)
    last_case.write_bytes(properties)
    assert is_preprocessed(folder, "3d_fullres", "nnUNetPlans", raw)
    data = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**data, "numTraining": 6}))  # replaced, e.g. convert --overwrite
    assert not is_preprocessed(folder, "3d_fullres", "nnUNetPlans", raw)


def test_preprocessing_reruns_the_right_nnunet_command(env, monkeypatch):
    calls = []
    monkeypatch.setattr(nnunet_commands, "run", lambda args, run_env: calls.append(args))
    raw = Path(env["nnUNet_raw"]) / DATASET
    (raw / "dataset.json").write_text(json.dumps({**json.loads((raw / "dataset.json").read_text()), "numTraining": 6}))
    with pytest.raises(LLMSettingError, match="did not produce 3d_fullres"):  # the stand-in ran nothing
        ensure_preprocessed(DATASET_ID, "3d_fullres", env)
    assert calls[-1][:2] == ["nnUNetv2_plan_and_preprocess", "-d"] and "--clean" in calls[-1]  # new fingerprint
    own_plans = Path(env["nnUNet_preprocessed"]) / DATASET / "myPlans.json"
    plans = json.loads(own_plans.with_name("nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["data_identifier"] = "myPlans_3d_fullres"
    own_plans.write_text(json.dumps(plans))
    with pytest.raises(LLMSettingError) as info:  # the raw data changed: the user's planner must re-plan
        ensure_preprocessed(DATASET_ID, "3d_fullres", env, "myPlans")
    assert "re-plan with your planner" in str(info.value) and info.value.setting == "-p"
    shutil.copy(Path(env["nnUNet_preprocessed"]) / DATASET / "dataset.json", raw / "dataset.json")
    with pytest.raises(LLMSettingError):
        ensure_preprocessed(DATASET_ID, "3d_fullres", env, "myPlans")
    assert calls[-1] == ["nnUNetv2_preprocess", "-d", "990", "-plans_name", "myPlans", "-c", "3d_fullres", "-np", "2"]


def test_several_folders_of_one_dataset_id_are_refused(tmp_path):
    for name in ("Dataset004_Hippocampus", "Dataset004_Other"):
        (tmp_path / name).mkdir()
    (tmp_path / "Dataset005_Notes.txt").touch()
    with pytest.raises(LLMSettingError) as info:
        dataset_folder(str(tmp_path), 4)
    assert "Dataset004_Hippocampus, Dataset004_Other" in str(info.value) and info.value.setting == "-d"
    assert dataset_folder(str(tmp_path), 5) is None  # a file is no dataset folder


def test_demo_checks_trainer_and_fold_before_converting(capsys, tmp_path, monkeypatch):
    from test_bad_inputs import cli_error

    monkeypatch.setattr(demo, "ensure_raw_from_msd", must_not_run("the conversion"))
    args = ["demo", "--work-dir", str(tmp_path / "work")]
    line = cli_error(capsys, *args, "--trainer", "nnUNetTrainerLLM_10epoch")
    assert "no nnU-Net trainer class named nnUNetTrainerLLM_10epoch (" in line and line.endswith("(fix: --trainer)")
    line = cli_error(capsys, *args, "--fold", "9")
    assert "fold 9 is not in the dataset's 5-fold split" in line and line.endswith("(fix: --fold)")
    monkeypatch.setattr(demo, "ensure_raw_from_msd", reached)
    with pytest.raises(Reached):
        demo.run_demo(tmp_path / "work", "nnUNetTrainerLLM_10epochs_25iters", "cpu", "all")
