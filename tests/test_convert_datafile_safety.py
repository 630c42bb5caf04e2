"""convert-datafile refuses inputs and targets that would silently corrupt or destroy data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_convert_datafile import CASES, make_task, write_image

from nnunetv2_llm.cli import main as cli_main
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.tools.convert_datafile import convert_datafile


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_images_and_labels_are_refused_all_at_once(tmp_path, capsys):
    task = make_task(tmp_path, lines=["x"])
    write_image(task / "imagesTr" / "a.nii.gz", dtype=np.float32)
    write_image(task / "labelsTr" / "a.nii")  # uncompressed: SimpleITK reads half of it as zeros
    truncate(task / "labelsTr" / "a.nii")
    truncate(task / "imagesTr" / f"{CASES[1]}.nii.gz")  # cut gzip stream
    (task / "data_file.txt").write_text(f"imagesTr/{CASES[0]}.nii.gz,labelsTr/{CASES[0]}.nii.gz\n"
                                        f"imagesTr/{CASES[1]}.nii.gz,labelsTr/{CASES[1]}.nii.gz\n"
                                        "imagesTr/a.nii.gz,labelsTr/a.nii\n")
    with pytest.raises(LLMSettingError) as e:
        convert_datafile(task, 504, output_root=tmp_path / "raw")
    message = str(e.value)
    assert f"line 2: image 'imagesTr/{CASES[1]}.nii.gz'" in message and "gzip stream" in message
    assert "line 3: label 'labelsTr/a.nii'" in message and "truncated" in message
    assert "line 1:" not in message and "remove their lines from the data file" in message
    assert not (tmp_path / "raw").exists()

    argv = ["convert-datafile", "-i", str(task), "-d", "504", "--output-root", str(tmp_path / "raw")]
    assert cli_main(argv) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_overwrite_never_deletes_the_input_folder(tmp_path, capsys):
    task = tmp_path / "r2" / "Dataset600_Foo"
    shutil.move(make_task(tmp_path / "src"), task)
    before = sorted(str(p.relative_to(task)) for p in task.rglob("*"))
    argv = ["convert-datafile", "-i", str(task), "-d", "600", "--name", "Foo", "--output-root",
            str(tmp_path / "r2"), "--overwrite"]
    assert cli_main(argv) == 2
    assert "would be, hold or sit inside the input" in capsys.readouterr().err
    assert sorted(str(p.relative_to(task)) for p in task.rglob("*")) == before
    assert [p.name for p in (tmp_path / "r2").iterdir()] == ["Dataset600_Foo"]  # no partial folder either
    with pytest.raises(LLMSettingError, match="sit inside the input") as e:  # without --overwrite: no such hint
        convert_datafile(task, 600, name="Foo", output_root=tmp_path / "r2")
    assert "pass --overwrite" not in str(e.value)


@pytest.mark.parametrize("layout", ["target_holds_task", "task_holds_target", "target_holds_datafile"])
def test_target_overlapping_the_input_is_refused(tmp_path, layout):
    datafile = "data_file.txt"
    if layout == "target_holds_task":  # task = raw/Dataset007_Foo/Data_Folder/Task04_Hippocampus
        task, root = make_task(tmp_path / "raw" / "Dataset007_Foo"), tmp_path / "raw"
    elif layout == "task_holds_target":
        task = make_task(tmp_path)
        root = task / "raw"
    else:  # the data file, given by absolute path, lies in the dataset folder that --overwrite deletes
        task, root = make_task(tmp_path), tmp_path / "raw"
        (root / "Dataset007_Foo").mkdir(parents=True)
        datafile = root / "Dataset007_Foo" / "pairs.txt"
        shutil.copyfile(task / "data_file.txt", datafile)
    with pytest.raises(LLMSettingError, match="sit inside the input"):
        convert_datafile(task, 7, name="Foo", datafile=datafile, output_root=root, overwrite=True)
    assert (task / "data_file.txt").is_file() and Path(task, datafile).is_file()
    assert not (root / "Dataset007_Foo" / "dataset.json").exists()


def test_output_root_that_is_a_file_gives_one_line_error(tmp_path, capsys):
    task = make_task(tmp_path)
    (tmp_path / "raw").write_text("not a folder")
    for root in (tmp_path / "raw", tmp_path / "raw" / "deeper"):
        with pytest.raises(LLMSettingError, match=r"raw exists and is not a folder \(fix: --output-root"):
            convert_datafile(task, 504, output_root=root)
    assert cli_main(["convert-datafile", "-i", str(task), "-d", "504", "--output-root", str(tmp_path / "raw")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "raw").read_text() == "not a folder"


def test_home_relative_entries_are_expanded_and_checked(tmp_path, monkeypatch):
    """'~' in an entry is expanded before the containment check, so it cannot reach outside the task folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    task = make_task(tmp_path, lines=[f"~/{CASES[0]}.nii.gz,labelsTr/{CASES[0]}.nii.gz"])
    with pytest.raises(LLMSettingError, match="line 1 .*outside the task folder"):
        convert_datafile(task, 504, output_root=tmp_path / "raw")


def test_overwrite_warns_that_the_preprocessed_data_is_stale(tmp_path, capsys, monkeypatch):
    """nnU-Net's preprocessed data of a replaced dataset no longer matches it: one warning line on stderr."""
    task = make_task(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    convert_datafile(task, 504, output_root=tmp_path / "raw")
    convert_datafile(task, 504, output_root=tmp_path / "raw", overwrite=True)
    assert "warning" not in capsys.readouterr().err  # nothing preprocessed yet
    (tmp_path / "preprocessed" / "Dataset504_Hippocampus").mkdir(parents=True)
    convert_datafile(task, 504, output_root=tmp_path / "raw", overwrite=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Dataset504_Hippocampus holds nnU-Net's preprocessed data" in lines[0]
    assert "nnUNetv2_plan_and_preprocess -d 504 --clean" in lines[0]
