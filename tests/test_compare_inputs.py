"""compare on what real runs leave behind: nnU-Net's split, interrupted validation, unreadable files, .tif
datasets, bad options, an existing output folder and what each trainer folder was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from test_compare import DATASET, DATASET_JSON, LLM, LOG, REF, ground_truth, llm_prediction, write

from nnunetv2_llm.evaluation.compare import run as run_module
from nnunetv2_llm.evaluation.compare.checks import CompareError, check_comparable
from nnunetv2_llm.evaluation.compare.cli import parse_tolerance
from nnunetv2_llm.evaluation.compare.curves import training_curves
from nnunetv2_llm.evaluation.compare.run import compare

CASES = ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
PLANS_BLOCK = {"mixer": "pretrained", "source": "/models/smollm2.gguf", "source_format": "gguf", "layer": 29,
               "model_type": "llama", "llm_config": {"hidden_size": 576}, "dtype": "float32",
               "layer_sha256": "0123456789abcdef" * 4, "rank": 64, "lora_rank": 0, "lora_alpha": 16, "seed": 0}


def trainer_dir(root: Path, trainer: str) -> Path:
    return root / "results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


def make_layout(root: Path, predicted: dict[str, list[str]], split: list[str] | None = CASES) -> Path:
    """Fold 0 of both trainers with predictions for ``predicted[trainer]``, nnU-Net's split (fold 0 validates
    ``split``; None: no splits_final.json) and the ground truth of every case."""
    preprocessed = root / "preprocessed" / DATASET
    for case in CASES + ["hippocampus_004"]:
        write(preprocessed / "gt_segmentations" / f"{case}.nii.gz", ground_truth())
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
    if split is not None:
        (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["hippocampus_009"], "val": split}]))
    for trainer, cases in predicted.items():
        validation = trainer_dir(root, trainer) / "fold_0" / "validation"
        validation.mkdir(parents=True, exist_ok=True)
        for case in cases:
            write(validation / f"{case}.nii.gz", ground_truth() if trainer == REF else llm_prediction(case))
        (validation / "summary.json").write_text("{}")
    return root


def run(root: Path, out: Path | None = None, **kwargs) -> Path:
    return compare(DATASET, "3d_fullres", [REF, LLM], kwargs.pop("folds", [0]), out or root / "out",
                   results_root=root / "results", preprocessed_root=root / "preprocessed", workers=1, **kwargs)


@pytest.fixture
def full(tmp_path) -> Path:
    return make_layout(tmp_path, {REF: CASES, LLM: CASES})


# ------------------------------------------------------------------------------------- expected cases, split
def test_a_case_missing_for_every_trainer_is_listed_with_the_command(tmp_path):
    root = make_layout(tmp_path, {REF: CASES[:2], LLM: CASES[:1]}, split=CASES + ["hippocampus_004"])
    text = run(root).read_text()
    val = "nnUNetv2_train 4 3d_fullres 0 -tr {} --val"
    assert (f"- fold 0, `hippocampus_002`: no prediction from {LLM}. Regenerate: `{val.format(LLM)}`" in text)
    for case in ("hippocampus_003", "hippocampus_004"):
        assert (f"- fold 0, `{case}`: no prediction from {REF}, {LLM}. Regenerate: `{val.format(REF)}`; "
                f"`{val.format(LLM)}`") in text
    assert "None: every" not in text
    assert "paired cases: 1 (fold 0: 1)" in text
    assert "splits_final.json" in text and "fold's `val` list" in text


def test_a_prediction_outside_the_fold_split_is_an_error(tmp_path):
    root = make_layout(tmp_path, {REF: CASES, LLM: CASES}, split=CASES[:2])
    with pytest.raises(CompareError) as info:
        run(root)
    message = str(info.value)
    assert str(trainer_dir(root, REF) / "fold_0" / "validation") in message
    assert "hippocampus_003" in message and "not in fold 0's validation split" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_without_splits_final_json_the_report_says_what_it_cannot_see(tmp_path):
    root = make_layout(tmp_path, {REF: CASES, LLM: CASES}, split=None)
    text = run(root).read_text()
    assert "splits_final.json not found" in text and "missing for every trainer cannot be detected" in text


def test_interrupted_validation_is_noted(full):
    (trainer_dir(full, LLM) / "fold_0" / "validation" / "summary.json").unlink()
    text = run(full).read_text()
    assert (f"- `{LLM}` fold 0: no validation/summary.json (nnU-Net's validation did not finish); rerun "
            f"`nnUNetv2_train 4 3d_fullres 0 -tr {LLM} --val`") in text
    assert f"`{REF}` fold 0: no validation/summary.json" not in text


# ------------------------------------------------------------------------------------------ unreadable files
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_prediction_names_the_file_and_the_command(full, damage):
    path = trainer_dir(full, LLM) / "fold_0" / "validation" / "hippocampus_002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CompareError) as info:
        run(full)
    message = str(info.value)
    assert message.startswith(f"{path} cannot be read (") and "\n" not in message
    assert message.endswith(f"regenerate it: nnUNetv2_train 4 3d_fullres 0 -tr {LLM} --val")


def test_an_unreadable_ground_truth_names_the_file(full):
    path = full / "preprocessed" / DATASET / "gt_segmentations" / "hippocampus_001.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(CompareError, match=r"cannot be read .*run nnUNetv2_plan_and_preprocess -d 4") as info:
        run(full)
    assert str(path) in str(info.value)


def test_an_unreadable_checkpoint_final_falls_back_to_the_logs(full):
    fold = trainer_dir(full, LLM) / "fold_0"
    (fold / "checkpoint_final.pth").write_bytes(b"")
    (fold / "training_log_2025_1_1_10_00_00.txt").write_text(LOG.format(e=0, tr=0.4, va=0.5, d1=0.6, d2=0.8))
    curves, source = training_curves(fold)
    assert curves.train_loss.tolist() == [0.4]
    assert source.startswith("training_log_*.txt (checkpoint_final.pth unreadable:")
    (fold / "training_log_2025_1_1_10_00_00.txt").unlink()
    assert training_curves(fold)[0] is None
    text = run(full).read_text()
    assert f"- `{LLM}` fold 0: no readable checkpoint or training log (checkpoint_final.pth unreadable:" in text


# ------------------------------------------------------------------------------------------------ .tif data
def test_tif_datasets_take_the_spacing_from_nnunets_sidecar_json(tmp_path):
    """nnU-Net's Tiff3DIO keeps the spacing (z, y, x) in CASE.json beside CASE.tif."""
    preprocessed = tmp_path / "preprocessed" / DATASET
    (preprocessed / "gt_segmentations").mkdir(parents=True)
    (preprocessed / "dataset.json").write_text(json.dumps({**DATASET_JSON, "file_ending": ".tif"}))
    spacing = {"spacing": [2.0, 0.8, 0.8]}
    tifffile.imwrite(preprocessed / "gt_segmentations" / "hippocampus_001.tif", ground_truth())
    (preprocessed / "gt_segmentations" / "hippocampus_001.json").write_text(json.dumps(spacing))
    for trainer in (REF, LLM):
        validation = trainer_dir(tmp_path, trainer) / "fold_0" / "validation"
        validation.mkdir(parents=True)
        pred = ground_truth() if trainer == REF else llm_prediction("hippocampus_001")
        tifffile.imwrite(validation / "hippocampus_001.tif", pred)
        (validation / "hippocampus_001.json").write_text(json.dumps(spacing))
    run(tmp_path)
    df = pd.read_csv(tmp_path / "out" / "per_case_metrics.csv")
    anterior = df[(df.trainer == LLM) & (df.label == 1)].iloc[0]
    assert anterior.hd95 == pytest.approx(2.0)  # the one-slice shift is 2 mm, not 1


# ------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("values,problem", [
    (["3=2"], "label 3 is not a foreground label of dataset.json"),
    (["1=nan"], "must be a finite number of mm > 0"),
    (["0"], "must be a finite number of mm > 0"),
    (["1=-1"], "must be a finite number of mm > 0"),
    (["inf"], "must be a finite number of mm > 0"),
])
def test_bad_nsd_tolerances_are_refused(full, values, problem):
    with pytest.raises(CompareError, match=problem):
        run(full, nsd_tolerance_mm=parse_tolerance(values))
    assert not (full / "out").exists()


def test_a_label_given_twice_is_refused():
    with pytest.raises(CompareError, match="label 1 is given twice"):
        parse_tolerance(["1=2", "2=1", "1=3"])


def test_duplicate_folds_and_trainers_are_refused():
    with pytest.raises(CompareError, match=r"fold\(s\) 0 given more than once"):
        check_comparable([REF, LLM], [0, 1, 0])
    with pytest.raises(CompareError, match="two distinct trainers") as info:
        check_comparable([REF, REF], [0], "--layers")
    assert str(info.value).endswith("(fix: --layers)")


def test_compare_refuses_duplicate_folds(full):
    with pytest.raises(CompareError, match="given more than once"):
        run(full, folds=[0, 0])


# ----------------------------------------------------------------------------------------- output folder
def test_an_existing_report_is_refused_unless_overwrite(full):
    out = full / "out"
    run(full)
    (out / "dice_per_layer.png").write_bytes(b"from an earlier sweep")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CompareError, match=r"is not empty .*pass --overwrite") as info:
        run(full)
    assert str(info.value).endswith("(fix: -o / --overwrite)")
    run(full, overwrite=True)
    assert not (out / "dice_per_layer.png").exists()  # no stale output of another run beside the new ones
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the report's are left alone
    assert sorted(p.name for p in full.iterdir()) == ["out", "preprocessed", "results"]


def test_a_failure_leaves_the_previous_report_untouched(full, monkeypatch):
    out = full / "out"
    run(full)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (trainer_dir(full, LLM) / "fold_0" / "validation" / "hippocampus_001.nii.gz").unlink()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "plot_curves", fail)
    with pytest.raises(OSError, match="disk full"):
        run(full, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in full.iterdir()) == ["out", "preprocessed", "results"]  # no partial folder


def test_an_output_path_under_a_file_is_refused_up_front(full):
    (full / "a_file").touch()
    with pytest.raises(CompareError, match="a_file exists and is not a folder"):
        run(full, full / "a_file" / "out")


# ----------------------------------------------------------------------------------- what was trained how
def test_the_report_shows_each_trainers_llm_settings_and_epochs(full):
    for trainer, plans in ((REF, {}), (LLM, {"nnunetv2_llm": PLANS_BLOCK})):
        (trainer_dir(full, trainer) / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", **plans}))
    logging = {"train_losses": [0.5, 0.3, 0.1], "val_losses": [0.6, 0.4, 0.3], "mean_fg_dice": [0.2, 0.5, 0.7]}
    torch.save({"network_weights": {}, "logging": logging}, trainer_dir(full, REF) / "fold_0" / "checkpoint_final.pth")
    (trainer_dir(full, LLM) / "fold_0" / "training_log_2025_1_1_10_00_00.txt").write_text(
        LOG.format(e=0, tr=0.4, va=0.5, d1=0.6, d2=0.8) + LOG.format(e=1, tr=0.2, va=0.3, d1=0.7, d2=0.9))
    text = run(full).read_text()
    assert f"| {REF} | - | - | - | - | - | 3 |" in text
    assert f"| {LLM} | pretrained | `/models/smollm2.gguf` | 29 | float32 | 0123456789ab | 2 |" in text
    warning = next(line for line in text.splitlines() if "unequal training budgets" in line)
    assert f"fold 0: {REF} 3, {LLM} 2 epochs" in warning
    assert text.index(warning) < text.index("## Cases excluded")


@pytest.mark.parametrize("plans,cell", [("{not json", "unreadable plans.json"),
                                        ('{"nnunetv2_llm": {"layer": 1}}', "malformed `nnunetv2_llm`")])
def test_a_plans_json_that_cannot_tell_is_named_in_the_settings_table(full, plans, cell):
    (trainer_dir(full, LLM) / "plans.json").write_text(plans)
    assert f"| {LLM} | {cell} | ? | ? | ? | ? |" in run(full).read_text()


def test_equal_budgets_give_no_warning(full):
    text = run(full).read_text()
    assert "unequal training budgets" not in text
    assert f"| {LLM} | no plans.json | ? | ? | ? | ? |" in text


def test_epochs_are_listed_per_fold_when_they_differ(tmp_path):
    root = make_layout(tmp_path, {REF: CASES, LLM: CASES})
    for fold, epochs in ((0, 2), (1, 1)):
        for trainer in (REF, LLM):
            fold_dir = trainer_dir(root, trainer) / f"fold_{fold}"
            if fold == 1:
                write(fold_dir / "validation" / "hippocampus_004.nii.gz", ground_truth())
            (fold_dir / "training_log_1.txt").write_text("".join(
                LOG.format(e=e, tr=0.4, va=0.5, d1=0.6, d2=0.8) for e in range(epochs)))
    (root / "preprocessed" / DATASET / "splits_final.json").write_text(json.dumps(
        [{"train": [], "val": CASES}, {"train": [], "val": ["hippocampus_004"]}]))
    text = run(root, folds=[0, 1]).read_text()
    assert f"| {REF} | no plans.json | ? | ? | ? | ? | fold 0: 2, fold 1: 1 |" in text
    assert "unequal training budgets" not in text  # within each fold the trainers agree


def test_single_slice_cases_are_measured_in_2d(tmp_path):
    """2D data (1xHxW volumes): surface distances in the image plane, not over a fake third axis."""
    from nnunetv2_llm.evaluation.metrics.per_case import binary_metrics

    root = make_layout(tmp_path, {REF: [], LLM: []})
    ref2d, pred2d = np.zeros((1, 12, 12), np.uint8), np.zeros((1, 12, 12), np.uint8)  # spacing 2 mm on the z axis
    ref2d[0, 2:8, 2:6] = 1
    pred2d[0, 4:10, 2:8] = 1
    write(root / "preprocessed" / DATASET / "gt_segmentations" / "hippocampus_001.nii.gz", ref2d)
    write(trainer_dir(root, REF) / "fold_0" / "validation" / "hippocampus_001.nii.gz", ref2d)
    write(trainer_dir(root, LLM) / "fold_0" / "validation" / "hippocampus_001.nii.gz", pred2d)
    (root / "preprocessed" / DATASET / "splits_final.json").write_text(json.dumps([{"train": [], "val": CASES[:1]}]))
    run(root)
    df = pd.read_csv(root / "out" / "per_case_metrics.csv")
    row = df[(df.trainer == LLM) & (df.label == 1)].iloc[0]
    expected = binary_metrics(pred2d[0] == 1, ref2d[0] == 1, (0.8, 0.8), 1.0)
    assert 0 < expected["nsd"] < 1
    assert (row.dice, row.nsd, row.hd95) == pytest.approx((expected["dice"], expected["nsd"], expected["hd95"]))
