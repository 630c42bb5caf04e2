"""nnU-Net's cascade with the LLM trainer, end to end with nnU-Net's own commands: 3d_lowres, its next-stage
predictions, then 3d_cascade_fullres, whose network takes the image plus the one-hot low-resolution segmentation.

Hippocampus images are too small for nnU-Net to plan a 3d_lowres stage, so five cases of the embedded subset are
upsampled 2x and planned with a small GPU-memory target (smaller patches), which makes nnU-Net plan the cascade.
The low-resolution stage is trained on fold 'all' (its validation then predicts the next stage for every case,
which the cascade's training cases need); the cascade is trained on fold 0 and then predicts a new scan with
``nnUNetv2_predict -prev_stage_predictions``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from reliability_helpers import no_traceback, run_command, train_env
from scipy.ndimage import zoom

from nnunetv2_llm.common.nnunet_commands import FIXTURE, demo_env
from nnunetv2_llm.model.spec import PLANS_KEY
from nnunetv2_llm.trainers.reliability import load_checkpoint_file

DATASET = "7"
PLANS = "nnUNetPlansCascadeTest"
TRAINER = "nnUNetTrainerLLM_1epoch_2iters"


def write_upsampled_dataset(raw: Path, cases: int = 5, factor: int = 2) -> None:
    folder = raw / "Dataset007_HippocampusUpsampled"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for label in sorted((FIXTURE / "labelsTr").glob("hippocampus_*.nii.gz"))[:cases]:
        name = label.name.removesuffix(".nii.gz")
        image = np.asarray(nib.load(FIXTURE / "imagesTr" / label.name).dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(label).dataobj, dtype=np.uint8)
        nib.save(nib.Nifti1Image(zoom(image, factor, order=1), np.eye(4)), folder / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(zoom(seg, factor, order=0), np.eye(4)), folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "imagesTs").mkdir()
    for scan in sorted((FIXTURE / "imagesTs").glob("*.nii.gz")):
        image = np.asarray(nib.load(scan).dataobj, dtype=np.float32)
        nib.save(nib.Nifti1Image(zoom(image, factor, order=1), np.eye(4)),
                 folder / "imagesTs" / scan.name.replace(".nii.gz", "_0000.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIO"}))


def test_lowres_then_cascade_fullres(tmp_path, tiny_llama):
    env = train_env(demo_env(tmp_path), tmp_path / "nnUNet_results", tiny_llama)
    write_upsampled_dataset(Path(env["nnUNet_raw"]))

    def ok(*args: str, **extra_env: str) -> None:
        run = run_command(list(args), {**env, **extra_env}, timeout=900)
        assert run.returncode == 0 and no_traceback(run.output), run.output[-3000:]

    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for the 0 that training uses here
    ok("nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_lowres", "3d_fullres", "-np", "1",
       "-gpu_memory_target", "0.1", "-overwrite_plans_name", PLANS, nnUNet_n_proc_DA="1")
    preprocessed = Path(env["nnUNet_preprocessed"]) / "Dataset007_HippocampusUpsampled"
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    assert plans["configurations"]["3d_lowres"]["next_stage"] == "3d_cascade_fullres"

    ok("nnUNetv2_train", DATASET, "3d_lowres", "all", "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
    results = Path(env["nnUNet_results"]) / "Dataset007_HippocampusUpsampled"
    next_stage = results / f"{TRAINER}__{PLANS}__3d_lowres" / "predicted_next_stage" / "3d_cascade_fullres"
    assert len(list(next_stage.glob("*.b2nd"))) == 5

    ok("nnUNetv2_train", DATASET, "3d_cascade_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
    model = results / f"{TRAINER}__{PLANS}__3d_cascade_fullres"
    checkpoint = load_checkpoint_file(model / "fold_0" / "checkpoint_final.pth")
    first_conv = next(v for k, v in checkpoint["network_weights"].items() if k.endswith(".weight") and v.ndim == 5)
    assert first_conv.shape[1] == 3  # the image + one-hot Anterior and Posterior from the low-resolution stage
    assert any(k.startswith("bottleneck.mixer.layer.") for k in checkpoint["network_weights"])
    assert json.loads((model / "plans.json").read_text())[PLANS_KEY]["mixer"] == "pretrained"
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    # a new scan through both stages, as a user predicts with the cascade
    scans = Path(env["nnUNet_raw"]) / "Dataset007_HippocampusUpsampled" / "imagesTs"
    common = ["-d", DATASET, "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    ok("nnUNetv2_predict", "-i", str(scans), "-o", str(tmp_path / "lowres"), "-c", "3d_lowres", "-f", "all", *common)
    ok("nnUNetv2_predict", "-i", str(scans), "-o", str(tmp_path / "cascade"), "-c", "3d_cascade_fullres", "-f", "0",
       "-prev_stage_predictions", str(tmp_path / "lowres"), *common)
    scan = next(scans.glob("*.nii.gz"))
    prediction = nib.load(tmp_path / "cascade" / scan.name.replace("_0000.nii.gz", ".nii.gz"))
    assert prediction.shape == nib.load(scan).shape and set(np.unique(prediction.get_fdata())) <= {0, 1, 2}
