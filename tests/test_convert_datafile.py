"""convert-datafile on a MedVisionLlama-style task folder built from 3 fixture cases."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_llm.cli import main as cli_main
from nnunetv2_llm.common.dataset_checks import check_raw_dataset
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import FIXTURE
from nnunetv2_llm.tools.convert_datafile import convert_datafile

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
LABELS = ["background", "Anterior", "Posterior"]


def make_task(root: Path, lines: list[str] | None = None, msd_json: bool = False) -> Path:
    """Data_Folder/Task04_Hippocampus with 3 cases and a data_file.txt (header, blank, comment, spaces)."""
    task = root / "Data_Folder" / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (task / sub).mkdir(parents=True)
        for case in CASES:
            shutil.copyfile(FIXTURE / sub / f"{case}.nii.gz", task / sub / f"{case}.nii.gz")
    if msd_json:
        shutil.copyfile(FIXTURE / "dataset.json", task / "dataset.json")
    if lines is None:
        lines = ["image, label", ""] + [f"  imagesTr/{c}.nii.gz ,  labelsTr/{c}.nii.gz  " for c in CASES[:2]] \
                + ["# a comment", f"imagesTr/{CASES[2]}.nii.gz,labelsTr/{CASES[2]}.nii.gz,", ""]
    (task / "data_file.txt").write_text("\r\n".join(lines))
    return task


def write_image(path: Path, shape=(8, 9, 10), spacing=(1.0, 1.0, 1.0), value=1, dtype=np.uint8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(shape, dtype=dtype)
    array[2:4, 2:4, 2:4] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_converts_and_passes_nnunet_verify(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    task = make_task(tmp_path)
    out = convert_datafile(task, 504, labels=LABELS, channel_names=["MRI"], output_root=tmp_path / "raw")
    assert out == (tmp_path / "raw" / "Dataset504_Hippocampus").resolve()
    data = json.loads((out / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "MRI"}
    assert data["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert data["numTraining"] == 3 and data["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in CASES]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in CASES]
    for case in CASES:  # 3-D .nii.gz files are copied byte for byte
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == \
               (FIXTURE / "imagesTr" / f"{case}.nii.gz").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    check_raw_dataset(out)
    verify_dataset_integrity(str(out), num_processes=1)  # nnU-Net's own check (reads every image)


def test_labels_and_channels_from_the_task_msd_json_else_inferred(tmp_path):
    task = make_task(tmp_path / "a", msd_json=True)
    data = json.loads((convert_datafile(task, 5, output_root=tmp_path / "raw") / "dataset.json").read_text())
    assert data["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert data["channel_names"] == {"0": "MRI"}

    task = make_task(tmp_path / "b")
    out = convert_datafile(task, 6, name="Hippo", output_root=tmp_path / "raw")
    data = json.loads((out / "dataset.json").read_text())
    assert out.name == "Dataset006_Hippo"
    assert data["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert data["channel_names"] == {"0": "image"}


def test_output_root_from_env_and_required(tmp_path, monkeypatch):
    task = make_task(tmp_path)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(LLMSettingError, match="--output-root"):
        convert_datafile(task, 504)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "envraw"))
    assert convert_datafile(task, 504).parent == (tmp_path / "envraw").resolve()


def test_escaping_entries_are_rejected_with_their_line(tmp_path):
    outside = tmp_path / "outside.nii.gz"
    shutil.copyfile(FIXTURE / "imagesTr" / "hippocampus_001.nii.gz", outside)
    task = make_task(tmp_path, lines=["x"])  # replaced below, once the folder exists
    (task / "imagesTr" / "link.nii.gz").symlink_to(outside)
    ok = "labelsTr/hippocampus_001.nii.gz"
    (task / "data_file.txt").write_text("\n".join([
        f"imagesTr/hippocampus_001.nii.gz,{ok}",               # line 1 fine
        f"../outside.nii.gz,{ok}",                             # line 2 ../
        f"{outside},{ok}",                                     # line 3 absolute outside
        f"imagesTr/link.nii.gz,{ok}",                          # line 4 symlink out
        f"imagesTr/../../../outside.nii.gz,{ok}",               # line 5 sneaky ..
    ]))
    with pytest.raises(LLMSettingError) as e:
        convert_datafile(task, 504, output_root=tmp_path / "raw")
    message = str(e.value)
    for line in (2, 3, 4, 5):
        assert f"line {line} (" in message
    assert "line 1 (" not in message
    assert "outside the task folder" in message
    assert not (tmp_path / "raw" / "Dataset504_Hippocampus").exists()


def test_absolute_path_inside_the_task_is_accepted(tmp_path):
    task = make_task(tmp_path, lines=["x"])
    (task / "data_file.txt").write_text("\n".join(
        f"{(task / 'imagesTr' / (c + '.nii.gz')).resolve()},labelsTr/{c}.nii.gz" for c in CASES))
    out = convert_datafile(task, 504, output_root=tmp_path / "raw")
    assert len(list((out / "imagesTr").iterdir())) == 3


def test_missing_file_bad_fields_and_duplicates_name_the_line(tmp_path):
    task = make_task(tmp_path, lines=[
        "imagesTr/hippocampus_001.nii.gz,labelsTr/hippocampus_001.nii.gz",
        "imagesTr/hippocampus_999.nii.gz,labelsTr/hippocampus_001.nii.gz",
        "imagesTr/hippocampus_003.nii.gz",
        "imagesTr/hippocampus_003.nii.gz,labelsTr/hippocampus_003.nii.gz,labelsTr/x.nii.gz",
        "imagesTr/hippocampus_001.nii.gz,labelsTr/hippocampus_001.nii.gz",
        "imagesTr/hippocampus_004.nii.gz,labelsTr/hippocampus_004.txt",
    ])
    with pytest.raises(LLMSettingError) as e:
        convert_datafile(task, 504, output_root=tmp_path / "raw")
    message = str(e.value)
    assert "line 2 (" in message and "does not exist" in message and "hippocampus_999" in message
    assert "line 3 (" in message and "found 1 field(s)" in message
    assert "line 4 (" in message and "found 3 field(s)" in message
    assert "line 5 (" in message and "already listed on line 1" in message
    assert "line 6 (" in message and "not an image file" in message
    assert not (tmp_path / "raw").exists()


def test_geometry_mismatch_is_reported(tmp_path):
    task = make_task(tmp_path, lines=["x"])
    write_image(task / "imagesTr" / "a.nii.gz", shape=(8, 9, 10), dtype=np.float32)
    write_image(task / "labelsTr" / "a.nii.gz", shape=(8, 9, 11))
    write_image(task / "imagesTr" / "b.nii.gz", spacing=(1.0, 1.0, 2.0), dtype=np.float32)
    write_image(task / "labelsTr" / "b.nii.gz", spacing=(1.0, 1.0, 1.0))
    (task / "data_file.txt").write_text("imagesTr/hippocampus_001.nii.gz,labelsTr/hippocampus_001.nii.gz\n"
                                        "imagesTr/a.nii.gz,labelsTr/a.nii.gz\nimagesTr/b.nii.gz,labelsTr/b.nii.gz\n")
    with pytest.raises(LLMSettingError) as e:
        convert_datafile(task, 504, output_root=tmp_path / "raw")
    message = str(e.value)
    assert "line 2 (" in message and "image size (10, 9, 8) != label size (11, 9, 8)" in message
    assert "line 3 (" in message and "spacing" in message
    assert "line 1 (" not in message


def test_label_values_beyond_the_names_and_non_integer_labels(tmp_path):
    task = make_task(tmp_path)
    with pytest.raises(LLMSettingError, match="hold value 2"):
        convert_datafile(task, 504, labels=["background", "Anterior"], output_root=tmp_path / "raw")
    write_image(task / "imagesTr" / "f.nii.gz", dtype=np.float32)
    write_image(task / "labelsTr" / "f.nii.gz", value=0.5, dtype=np.float32)
    (task / "data_file.txt").write_text("imagesTr/f.nii.gz,labelsTr/f.nii.gz\n")
    with pytest.raises(LLMSettingError, match="not non-negative integers"):
        convert_datafile(task, 504, output_root=tmp_path / "raw")


def test_4d_images_are_split_into_channels(tmp_path):
    task = tmp_path / "Task01_Multi"
    volumes = [sitk.GetImageFromArray(np.full((6, 7, 8), c + 1, dtype=np.float32)) for c in range(2)]
    for v in volumes:
        v.SetSpacing((1.0, 1.0, 2.0))
    (task / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(sitk.JoinSeries(volumes), str(task / "imagesTr" / "case1.nii.gz"))
    write_image(task / "labelsTr" / "case1.nii.gz", shape=(6, 7, 8), spacing=(1.0, 1.0, 2.0))
    (task / "data_file.txt").write_text("imagesTr/case1.nii.gz,labelsTr/case1.nii.gz\n")
    with pytest.raises(LLMSettingError, match="1 channel name"):
        convert_datafile(task, 7, channel_names=["T1"], output_root=tmp_path / "raw")
    out = convert_datafile(task, 7, channel_names=["T1", "T2"], labels=["background", "tumour"],
                           output_root=tmp_path / "raw")
    assert out.name == "Dataset007_Multi"
    for c in range(2):
        image = sitk.ReadImage(str(out / "imagesTr" / f"case1_{c:04d}.nii.gz"))
        assert image.GetDimension() == 3 and image.GetSpacing() == (1.0, 1.0, 2.0)
        assert np.all(sitk.GetArrayFromImage(image) == c + 1)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}
    check_raw_dataset(out)


def test_never_overwrites_silently(tmp_path):
    task = make_task(tmp_path)
    out = convert_datafile(task, 504, output_root=tmp_path / "raw")
    marker = out / "imagesTr" / "stale_0000.nii.gz"
    marker.write_bytes(b"old")
    with pytest.raises(LLMSettingError, match="already exists; pass --overwrite"):
        convert_datafile(task, 504, output_root=tmp_path / "raw")
    assert marker.exists()
    with pytest.raises(LLMSettingError, match="already used by"):
        convert_datafile(task, 504, name="Other", output_root=tmp_path / "raw", overwrite=True)
    convert_datafile(task, 504, output_root=tmp_path / "raw", overwrite=True)
    assert not marker.exists() and len(list((out / "imagesTr").iterdir())) == 3


def test_cli(tmp_path, capsys):
    task = make_task(tmp_path)
    argv = ["convert-datafile", "-i", str(task), "-d", "12", "--name", "Hip", "--labels",
            "background,Anterior,Posterior", "--channel-names", "MRI", "--output-root", str(tmp_path / "raw")]
    assert cli_main(argv) == 0
    assert "nnUNetv2_plan_and_preprocess -d 12" in capsys.readouterr().out
    assert (tmp_path / "raw" / "Dataset012_Hip" / "dataset.json").is_file()
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert-datafile", "-i", str(tmp_path / "nope"), "-d", "13", "--output-root",
                     str(tmp_path / "raw")]) == 2
    assert "does not exist" in capsys.readouterr().err
