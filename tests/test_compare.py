"""End-to-end comparison on a synthetic nnU-Net results + preprocessed layout."""

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from scipy import stats
from test_metrics import shifted_cube_surface

from nnunetv2_llm.evaluation.compare.cases import CSV_COLUMNS, Case, evaluate_case
from nnunetv2_llm.evaluation.compare.checks import CompareError
from nnunetv2_llm.evaluation.compare.cli import add_arguments, main
from nnunetv2_llm.evaluation.compare.curves import training_curves
from nnunetv2_llm.evaluation.compare.run import compare

DATASET = "Dataset004_Hippocampus"
REF, LLM = "nnUNetTrainer", "nnUNetTrainerLLM"
FOLDS = {0: ["hippocampus_001", "hippocampus_002", "hippocampus_003"], 1: ["hippocampus_004", "hippocampus_006"]}
SPACING_XYZ = (0.8, 0.8, 2.0)  # SimpleITK order; numpy arrays are (z, y, x) -> spacing (2.0, 0.8, 0.8)
SHAPE_ZYX = (10, 12, 12)
DIAGONAL_MM = math.sqrt((10 * 2.0) ** 2 + 2 * (12 * 0.8) ** 2)
DATASET_JSON = {"labels": {"background": 0, "Anterior": 1, "Posterior": 2}, "file_ending": ".nii.gz",
                "channel_names": {"0": "MRI"}, "numTraining": 5}
LOG = "".join(f"{line} \n" for line in (  # nnU-Net ends each log line with a space
    "2025-01-01 10:00:00.000000: Epoch {e}",
    "2025-01-01 10:00:00.000000: Current learning rate: 0.01",
    "2025-01-01 10:00:01.000000: train_loss {tr}",
    "2025-01-01 10:00:01.000000: val_loss {va}",
    "2025-01-01 10:00:01.000000: Pseudo dice [np.float32({d1}), np.float32({d2})]",
    "2025-01-01 10:00:01.000000: Epoch time: 1.0 s",
))


def ground_truth() -> np.ndarray:
    a = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    a[2:6, 2:6, 2:6] = 1
    a[2:6, 7:11, 7:11] = 2
    return a


def llm_prediction(case: str) -> np.ndarray:
    """Anterior shifted by one slice (2 mm along z); Posterior missing in hippocampus_002."""
    a = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    a[3:7, 2:6, 2:6] = 1
    if case != "hippocampus_002":
        a[2:6, 7:11, 7:11] = 2
    return a


def write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nnunet")
    results, preprocessed = root / "results" / DATASET, root / "preprocessed" / DATASET
    (root / "raw").mkdir()
    all_cases = [c for cases in FOLDS.values() for c in cases] + ["hippocampus_005"]
    for case in all_cases:
        write(preprocessed / "gt_segmentations" / f"{case}.nii.gz", ground_truth())
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for trainer in (REF, LLM):
        tdir = results / f"{trainer}__nnUNetPlans__3d_fullres"
        tdir.mkdir(parents=True)
        (tdir / "dataset.json").write_text(json.dumps(DATASET_JSON))
        for fold, cases in FOLDS.items():
            for case in cases + (["hippocampus_005"] if fold == 1 and trainer == REF else []):
                pred = ground_truth() if trainer == REF else llm_prediction(case)
                write(tdir / f"fold_{fold}" / "validation" / f"{case}.nii.gz", pred)
    logging = {"train_losses": [0.5, 0.3, 0.1], "val_losses": [0.6, 0.4, 0.3], "mean_fg_dice": [0.2, 0.5, 0.7],
               "ema_fg_dice": [0.2, 0.23, 0.277]}
    torch.save({"network_weights": {}, "logging": logging},
               results / f"{REF}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth")
    (results / f"{LLM}__nnUNetPlans__3d_fullres" / "fold_0" / "training_log_2025_1_1_10_00_00.txt").write_text(
        LOG.format(e=0, tr=0.4, va=0.5, d1=0.6, d2=0.8) + LOG.format(e=1, tr=0.2, va=0.3, d1=0.7, d2=0.9)
    )
    return {"root": root, "results": root / "results", "preprocessed": root / "preprocessed"}


@pytest.fixture(scope="module")
def report(layout) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("raw", "results", "preprocessed"):
            mp.setenv(f"nnUNet_{name}", str(layout["root"] / name))
        return compare(4, "3d_fullres", [REF, LLM], [0, 1], layout["root"] / "out",
                       results_root=layout["results"], preprocessed_root=layout["preprocessed"], workers=2)


def test_csv_rows(report):
    df = pd.read_csv(report.parent / "per_case_metrics.csv")
    assert list(df.columns) == CSV_COLUMNS
    assert len(df) == (6 + 5) * 2  # reference 6 cases, LLM 5 cases, 2 labels
    ref = df[df.trainer == REF]
    assert (ref.dice == 1).all() and (ref.nsd == 1).all() and (ref.hd95 == 0).all()
    anterior = df[(df.trainer == LLM) & (df.label == 1)]
    assert (anterior.label_name == "Anterior").all()
    assert anterior.dice.to_numpy() == pytest.approx([0.75] * 5)
    assert anterior.hd95.to_numpy() == pytest.approx([2.0] * 5)  # z spacing, so the axis order is right
    # surface-element NSD at 1 mm: the 8 inner points of the face inside the other cube are 0.8 mm from its side,
    # the centre 1.6 mm, the far face 2 mm (see test_metrics)
    area, on_other, face_z = shifted_cube_surface(2.0, 0.8)
    assert anterior.nsd.to_numpy() == pytest.approx([(on_other + 8 * face_z) / area] * 5, abs=1e-6)
    empty = df[(df.trainer == LLM) & (df.case == "hippocampus_002") & (df.label == 2)].iloc[0]
    assert (empty.dice, empty.nsd, bool(empty.pred_empty), bool(empty.ref_empty)) == (0, 0, True, False)
    assert empty.hd95 == pytest.approx(DIAGONAL_MM)
    unpaired = df[df.case == "hippocampus_005"]
    assert set(unpaired.trainer) == {REF} and not unpaired.paired.any()
    assert df[df.case != "hippocampus_005"].paired.all()


def test_report_numbers(report):
    text = report.read_text()
    assert "Folds: 0, 1; paired cases: 5 (fold 0: 3, fold 1: 2); NSD tolerance: 1 mm." in text
    assert "- fold 1, `hippocampus_005`: no prediction from nnUNetTrainerLLM" in text
    assert "| Anterior | Dice | 1.0000 ± 0.0000 | 0.7500 ± 0.0000 |" in text
    assert "| Anterior | HD95 (mm) | 0.00 ± 0.00 | 2.00 ± 0.00 |" in text
    assert "| Posterior | Dice | 1.0000 ± 0.0000 | 0.8000 ± 0.4472 |" in text  # one empty prediction in 5
    p0 = stats.wilcoxon([-0.25] * 5).pvalue
    holm0 = min(1.0, 6 * p0)  # smallest of 3 equal p-values in a family of 6 (3 others are 1)
    assert (f"| {LLM} | Anterior | Dice | -0.2500 ± 0.0000 | [-0.2500, -0.2500] | {p0:.4g} | {holm0:.4g} | 0 / 5 / 0 |"
            in text)
    hd95_row = f"| {LLM} | Anterior | HD95 (mm) | 2.00 ± 0.00 | [2.00, 2.00] | {p0:.4g} | {holm0:.4g} | 0 / 5 / 0 |"
    assert hd95_row in text
    sd = np.std([0, -1, 0, 0, 0], ddof=1)
    assert f"| {LLM} | Posterior | Dice | -0.2000 ± {sd:.4f} |" in text
    assert "| 1 | 1 | 0 / 1 / 4 |" in text  # Posterior: only one non-zero difference -> p = 1
    assert f"- `{REF}` fold 0: checkpoint_final.pth" in text
    assert f"- `{LLM}` fold 0: training_log_*.txt" in text
    assert f"- `{LLM}` fold 1: no checkpoint or training log found" in text


def test_figures(report):
    for name in ("paired_differences.png", "training_curves.png"):
        data = (report.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_training_curves_from_logs_and_checkpoint(layout):
    ref_fold = layout["results"] / DATASET / f"{REF}__nnUNetPlans__3d_fullres" / "fold_0"
    curves, source = training_curves(ref_fold)
    assert source == "checkpoint_final.pth"
    assert curves.pseudo_dice.tolist() == pytest.approx([0.2, 0.5, 0.7])

    llm_fold = layout["results"] / DATASET / f"{LLM}__nnUNetPlans__3d_fullres" / "fold_0"
    curves, _ = training_curves(llm_fold)
    assert curves.epoch.tolist() == [0, 1]
    assert curves.train_loss.tolist() == pytest.approx([0.4, 0.2])
    assert curves.val_loss.tolist() == pytest.approx([0.5, 0.3])
    assert curves.pseudo_dice.tolist() == pytest.approx([0.7, 0.8])
    assert training_curves(llm_fold.parent / "fold_1") == (None, "no checkpoint or training log found")


def test_resumed_log_overrides_epochs(tmp_path):
    old, new = tmp_path / "training_log_2025_1_1_09_00_00.txt", tmp_path / "training_log_2025_1_1_10_00_00.txt"
    old.write_text(LOG.format(e=0, tr=0.9, va=0.9, d1=0.1, d2=0.1) + LOG.format(e=1, tr=0.8, va=0.8, d1=0.2, d2=0.2))
    new.write_text(LOG.format(e=1, tr=0.5, va=0.6, d1=0.3, d2=0.5))
    os.utime(old, (1, 1))
    curves, _ = training_curves(tmp_path)
    assert curves.train_loss.tolist() == pytest.approx([0.9, 0.5])
    assert curves.pseudo_dice.tolist() == pytest.approx([0.1, 0.4])


def test_missing_fold_names_the_command(layout, tmp_path):
    llm_fold2 = layout["results"] / DATASET / f"{LLM}__nnUNetPlans__3d_fullres" / "fold_2"
    llm_fold2.mkdir()
    (llm_fold2 / "checkpoint_final.pth").write_bytes(b"")
    try:
        with pytest.raises(CompareError) as info:
            compare(DATASET, "3d_fullres", [REF, LLM], [0, 2], tmp_path, results_root=layout["results"],
                    preprocessed_root=layout["preprocessed"], workers=1)
    finally:
        (llm_fold2 / "checkpoint_final.pth").unlink()
        llm_fold2.rmdir()
    lines = str(info.value).splitlines()
    val_cmd = f"Run: nnUNetv2_train 4 3d_fullres 2 -tr {LLM} --val"
    assert any(str(llm_fold2 / "validation") in ln and ln.endswith(val_cmd) for ln in lines)
    assert any(ln.endswith(f"has not been trained. Run: nnUNetv2_train 4 3d_fullres 2 -tr {REF}") for ln in lines)
    assert not (tmp_path / "report.md").exists()


def test_needs_two_trainers(layout, tmp_path):
    with pytest.raises(CompareError, match="two distinct trainers"):
        compare(DATASET, "3d_fullres", [REF], [0], tmp_path, results_root=layout["results"],
                preprocessed_root=layout["preprocessed"])


def test_per_class_nsd_tolerance(layout, tmp_path):
    report = compare(DATASET, "3d_fullres", [REF, LLM], [0], tmp_path, nsd_tolerance_mm={1: 2.0},
                     results_root=layout["results"], preprocessed_root=layout["preprocessed"], workers=1)
    text = report.read_text()
    assert "NSD tolerance: Anterior 2 mm, Posterior 1 mm." in text
    assert "| Anterior | NSD | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 |" in text  # every distance <= 2 mm
    assert "Holm correction over the 6 tests of this table." in text


def test_ignore_label_voxels_do_not_count(tmp_path):
    ref, pred = np.zeros(SHAPE_ZYX, dtype=np.uint8), np.zeros(SHAPE_ZYX, dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[2:6, 2:6, 6:8] = 3  # 'ignore'
    pred[2:6, 2:6, 2:8] = 1  # label 1 spills into the ignored region only
    write(tmp_path / "gt.nii.gz", ref)
    write(tmp_path / "pred.nii.gz", pred)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    (row,) = evaluate_case(Case(LLM, 0, "c", tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz", [1], 3, 1.0,
                                  SimpleITKIO, "", ""))
    assert (row["dice"], row["nsd"], row["hd95"]) == (1.0, 1.0, 0.0)


def test_command_line(layout, tmp_path, monkeypatch, capsys):
    for name in ("raw", "results", "preprocessed"):
        monkeypatch.setenv(f"nnUNet_{name}", str(layout["root"] / name))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["-d", "4", "-tr", REF, LLM, "-f", "0", "-o", str(tmp_path / "out"), "--workers", "1",
            "--nsd-tolerance-mm", "1=3"]
    assert main(parser.parse_args(args)) == 0
    assert "NSD tolerance: Anterior 3 mm, Posterior 1 mm." in (tmp_path / "out" / "report.md").read_text()
    from nnunetv2_llm import cli

    assert cli.main(["compare", "-d", "4", "-tr", REF, LLM, "-f", "3", "-o", str(tmp_path / "x")]) == 2
    assert f"Run: nnUNetv2_train 4 3d_fullres 3 -tr {LLM}" in capsys.readouterr().err


def test_command_line_error_is_one_line_exit_2(capsys):
    """`nnunetv2_llm compare` reports a comparison that cannot run like any bad input: one line, exit 2."""
    from nnunetv2_llm import cli

    assert cli.main(["compare", "-d", "4", "-tr", REF, REF, "-f", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nnunetv2_llm: error: give at least two distinct trainers"), err


def test_command_line_rejects_a_tolerance_that_is_not_a_number(capsys):
    from nnunetv2_llm import cli

    assert cli.main(["compare", "-d", "4", "-tr", REF, LLM, "--nsd-tolerance-mm", "abc"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["nnunetv2_llm: error: --nsd-tolerance-mm: give one number or LABEL=MM pairs, got abc"]


def test_corrupt_dataset_json_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from nnunetv2_llm import cli

    trainer_dir = tmp_path / "results" / DATASET / f"{REF}__nnUNetPlans__3d_fullres"
    trainer_dir.mkdir(parents=True)
    (trainer_dir / "dataset.json").write_text('{"labels": ')
    for name in ("results", "preprocessed"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    assert cli.main(["compare", "-d", DATASET, "-tr", REF, LLM, "-f", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{trainer_dir / 'dataset.json'} is not readable JSON" in err[0], err


def test_unwritable_output_folder_is_one_line_exit_2(layout, tmp_path, monkeypatch, capsys):
    """An output folder under a file is refused before anything is computed: one line naming the path, exit 2."""
    from nnunetv2_llm import cli

    for name in ("raw", "results", "preprocessed"):
        monkeypatch.setenv(f"nnUNet_{name}", str(layout["root"] / name))
    (tmp_path / "a_file").touch()
    out = tmp_path / "a_file" / "out"
    assert cli.main(["compare", "-d", "4", "-tr", REF, LLM, "-f", "0", "-o", str(out), "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"nnunetv2_llm: error: cannot write the report to {out}: {tmp_path / 'a_file'} exists and is not "
                   "a folder (fix: -o)"]


def test_dataset_json_without_labels_is_one_clear_error():
    from nnunetv2_llm.evaluation.compare.discover import _labels

    with pytest.raises(CompareError, match="no 'labels' mapping"):
        _labels({"channel_names": {"0": "MRI"}})
