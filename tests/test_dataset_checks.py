"""check_raw_dataset / check_dataset_json_paths: the message says what to run, or what is missing."""

import json
import shutil
from pathlib import Path

import pytest

from nnunetv2_llm.common.dataset_checks import check_dataset_json_paths, check_raw_dataset
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import FIXTURE

DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}


def make_v2(folder: Path, cases=("case_a", "case_b"), channels=1, **overrides) -> Path:
    """A valid nnU-Net v2 raw dataset layout (empty files: these checks never read images)."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        for c in range(channels):
            (folder / "imagesTr" / f"{case}_{c:04d}.nii.gz").touch()
        (folder / "labelsTr" / f"{case}.nii.gz").touch()
    data = {**DATASET_JSON, "numTraining": len(cases), **overrides}
    data = {k: v for k, v in data.items() if v is not None}
    (folder / "dataset.json").write_text(json.dumps(data))
    return folder


def message(folder) -> str:
    with pytest.raises(LLMSettingError) as e:
        check_raw_dataset(folder)
    return str(e.value)


def test_valid_v2_dataset_passes(tmp_path):
    check_raw_dataset(make_v2(tmp_path / "Dataset001_X"))
    check_raw_dataset(make_v2(tmp_path / "Dataset002_Y", channels=2, channel_names={"0": "T1", "1": "T2"}))


def test_msd_folder_says_convert_msd(tmp_path):
    text = message(FIXTURE)
    assert "Medical Segmentation Decathlon" in text
    assert f"nnUNetv2_convert_MSD_dataset -i {FIXTURE}" in text
    assert "convert-datafile" not in text
    task = tmp_path / "Task04_Hippocampus"
    shutil.copytree(FIXTURE, task)
    (task / "data_file.txt").write_text("imagesTr/hippocampus_001.nii.gz,labelsTr/hippocampus_001.nii.gz\n")
    text = message(task)
    assert "nnUNetv2_convert_MSD_dataset -i" in text and f"nnunetv2_llm convert-datafile -i {task}" in text


def test_datafile_folder_says_convert_datafile(tmp_path):
    task = tmp_path / "Task04_Hippocampus"
    (task / "imagesTr").mkdir(parents=True)
    (task / "data_file.txt").write_text("imagesTr/a.nii.gz,labelsTr/a.nii.gz\n")
    text = message(task)
    assert f"nnunetv2_llm convert-datafile -i {task}" in text
    assert "nnUNetv2_convert_MSD_dataset" not in text


def test_missing_pieces_are_named(tmp_path):
    assert "does not exist" in message(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no dataset.json" in message(tmp_path / "empty")

    folder = make_v2(tmp_path / "a")
    shutil.rmtree(folder / "labelsTr")
    assert "no labelsTr/" in message(folder)
    folder = make_v2(tmp_path / "b")
    shutil.rmtree(folder / "imagesTr")
    assert "no imagesTr/" in message(folder)
    for key in ("channel_names", "labels", "file_ending", "numTraining"):
        folder = make_v2(tmp_path / f"key_{key}", **{key: None})
        assert f"lacks the nnU-Net v2 keys ['{key}']" in message(folder)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    assert "not readable JSON" in message(tmp_path / "bad")


def test_wrong_contents_are_named(tmp_path):
    folder = make_v2(tmp_path / "a")
    (folder / "imagesTr" / "case_a_0000.nii.gz").rename(folder / "imagesTr" / "case_a.nii.gz")
    assert "without nnU-Net's 4-digit channel suffix, e.g. case_a.nii.gz" in message(folder)
    folder = make_v2(tmp_path / "b")
    (folder / "labelsTr" / "case_b.nii.gz").unlink()
    assert "lacks the label of 1 case(s), e.g. case_b.nii.gz" in message(folder)
    folder = make_v2(tmp_path / "c", numTraining=5)
    assert '"numTraining": 5 but imagesTr/ holds 2' in message(folder)
    folder = make_v2(tmp_path / "d", channel_names={"0": "T1", "1": "T2"})
    assert "case case_a has channels ['0000'], expected ['0000', '0001']" in message(folder)
    folder = make_v2(tmp_path / "e", labels={"0": "background", "1": "A"})
    assert '"background": 0' in message(folder)
    folder = make_v2(tmp_path / "f", file_ending="nii.gz")
    assert '"file_ending" must be a string like ".nii.gz"' in message(folder)


def test_dataset_json_paths_must_stay_inside(tmp_path):
    outside = tmp_path / "outside.nii.gz"
    outside.touch()
    folder = tmp_path / "Task01"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "imagesTr" / "link.nii.gz").symlink_to(outside)
    (folder / "imagesTr" / "ok.nii.gz").touch()

    def with_training(entries, key="training"):
        (folder / "dataset.json").write_text(json.dumps({key: entries}))

    with_training([{"image": "./imagesTr/ok.nii.gz", "label": "./labelsTr/ok.nii.gz"}], )
    check_dataset_json_paths(folder)
    with_training([str(folder / "imagesTr" / "ok.nii.gz")], key="test")
    check_dataset_json_paths(folder)
    for bad in ("../outside.nii.gz", str(outside), "imagesTr/link.nii.gz", "imagesTr/../../outside.nii.gz"):
        with_training([{"image": "imagesTr/ok.nii.gz", "label": "labelsTr/ok.nii.gz"},
                       {"image": bad, "label": "labelsTr/ok.nii.gz"}])
        with pytest.raises(LLMSettingError, match=r'"training"\[1\]\.image = .* points outside'):
            check_dataset_json_paths(folder)
    with_training(["../outside.nii.gz"], key="test")
    with pytest.raises(LLMSettingError, match=r'"test"\[0\]'):
        check_dataset_json_paths(folder)


def test_v2_dataset_dict_paths(tmp_path, monkeypatch):
    folder = make_v2(tmp_path / "Dataset003_Z")
    data = json.loads((folder / "dataset.json").read_text())
    data["dataset"] = {"case_a": {"images": ["imagesTr/case_a_0000.nii.gz"], "label": "labelsTr/case_a.nii.gz"},
                       "case_b": {"images": ["$ELSEWHERE/case_b_0000.nii.gz"], "label": "labelsTr/case_b.nii.gz"}}
    (folder / "dataset.json").write_text(json.dumps(data))
    monkeypatch.setenv("ELSEWHERE", str(folder / "imagesTr"))
    check_dataset_json_paths(folder)
    check_raw_dataset(folder)
    monkeypatch.setenv("ELSEWHERE", str(tmp_path))  # $VARS are expanded as nnU-Net does, then checked
    with pytest.raises(LLMSettingError, match=r'"dataset"\["case_b"\]\.images\[0\]'):
        check_dataset_json_paths(folder)
    assert "points outside" in message(folder)  # check_raw_dataset runs the path check too
