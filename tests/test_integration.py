"""nnU-Net's own commands, as a user runs them, on the embedded real Hippocampus subset (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import save_tiny_model

from nnunetv2_llm.common.nnunet_commands import dataset_folder, nnunet_command, run, trainer_fold_dir
from nnunetv2_llm.model.spec import FROZEN_PREFIX, PLANS_KEY, BottleneckSpec, frozen_layer_sha256

TRAINER = "nnUNetTrainerLLM_1epoch_2iters"


@pytest.fixture(scope="module")
def trained(nnunet_workdir) -> Path:
    run(["nnUNetv2_train", "4", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], nnunet_workdir)
    return trainer_fold_dir(nnunet_workdir, 4, "3d_fullres", TRAINER, "0")


def test_training_writes_a_self_contained_model_folder(trained):
    assert (trained / "checkpoint_final.pth").is_file()
    assert json.loads((trained / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
    spec = BottleneckSpec(**json.loads((trained.parent / "plans.json").read_text())[PLANS_KEY])
    assert spec.mixer == "pretrained" and spec.model_type == "llama" and spec.layer == 29
    checkpoint = torch.load(trained / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    assert frozen_layer_sha256(weights, spec.dtype) == spec.layer_sha256  # frozen: untouched
    # the optimizer holds exactly the trainable tensors (the state dict lists shared tensors under several keys)
    trainable = {v.data_ptr() for k, v in weights.items() if not k.startswith(FROZEN_PREFIX)}
    assert len(checkpoint["optimizer_state"]["param_groups"][0]["params"]) == len(trainable)


def _predict(model_env: dict, images: Path, out: Path) -> None:
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "4", "-c", "3d_fullres", "-f", "0",
         "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], model_env)


def test_predict_new_scan_has_input_geometry_and_valid_labels(trained, nnunet_workdir, tmp_path):
    images = dataset_folder(nnunet_workdir["nnUNet_raw"], 4) / "imagesTs"
    _predict(nnunet_workdir, images, tmp_path / "pred")
    source = sitk.ReadImage(str(next(images.glob("*.nii.gz"))))
    predicted = sitk.ReadImage(str(tmp_path / "pred" / "hippocampus_118.nii.gz"))
    assert predicted.GetSize() == source.GetSize()
    assert np.allclose(predicted.GetSpacing(), source.GetSpacing())
    assert np.allclose(predicted.GetOrigin(), source.GetOrigin())
    assert np.allclose(predicted.GetDirection(), source.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2}

    # The same model folder predicts the same segmentation where the LLM source is gone, or its path now holds
    # another model: the frozen weights come from the checkpoint, and the source is never read.
    moved_results = tmp_path / "results"
    shutil.copytree(trained.parent.parent, moved_results / trained.parent.parent.name)
    plans_file = moved_results / trained.parent.parent.name / trained.parent.name / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans[PLANS_KEY]["source"] = str(save_tiny_model(tmp_path / "another_llm", "llama", hidden_size=96))
    plans_file.write_text(json.dumps(plans))
    _predict({**nnunet_workdir, "nnUNet_results": str(moved_results)}, images, tmp_path / "pred_moved")
    moved = sitk.ReadImage(str(tmp_path / "pred_moved" / "hippocampus_118.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(predicted))


def test_trainer_variants_are_found_by_nnunet_lookup(nnunet_workdir):
    """Every documented name resolves; the baseline's variants that nnU-Net does not ship carry ReliabilityMixin."""
    names = ["nnUNetTrainerLLM", "nnUNetTrainerLLM_5epochs", "nnUNetTrainerLLMNoLLM_50epochs", "nnUNetTrainerLLMRandom",
             "nnUNetTrainerLLM_LoRA", "nnUNetTrainer_frac10", "nnUNetTrainerLLM_frac30_100epochs",
             "nnUNetTrainer_2epochs", "nnUNetTrainer_3epochs", "nnUNetTrainer_20epochs_250iters",
             "nnUNetTrainer_5epochs", "nnUNetTrainerLLM_bf16", "nnUNetTrainerLLMRandom_bf16_5epochs_25iters"]
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "from nnunetv2_llm.trainers.reliability import ReliabilityMixin\n"
            f"for n in {names!r}:\n"
            "    c = f(n); print('FOUND', c.__name__, issubclass(c, ReliabilityMixin))")
    result = subprocess.run([nnunet_command("python"), "-c", code], env={**os.environ, **nnunet_workdir},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = {line.split()[1]: line.split()[2] == "True" for line in result.stdout.splitlines()
             if line.startswith("FOUND ")}
    assert list(found) == names
    assert all(found[n] for n in names if n != "nnUNetTrainer_5epochs")
    assert not found["nnUNetTrainer_5epochs"]  # nnU-Net's own class, found first


@pytest.mark.parametrize("plans_name,configuration", [("nnUNetPlans", "2d"), ("nnUNetPlans", "3d_fullres"),
                                                       ("nnUNetResEncUNetMPlans", "3d_fullres")])
def test_block_wraps_nnunets_planned_networks(nnunet_workdir, plans_name, configuration):
    """The real plans nnU-Net made for the Hippocampus subset (default and ResEnc M preset), any configuration."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_llm.model.spec import LLMChoice, make_spec
    from nnunetv2_llm.trainers import nnUNetTrainerLLM

    preprocessed = dataset_folder(nnunet_workdir["nnUNet_preprocessed"], 4)
    if not (preprocessed / f"{plans_name}.json").is_file():  # planning only: no preprocessing needed
        run(["nnUNetv2_plan_experiment", "-d", "4", "-pl", "nnUNetPlannerResEncM"], nnunet_workdir)
    plans = json.loads((preprocessed / f"{plans_name}.json").read_text())
    make_spec(LLMChoice("identity", rank=8)).to_plans(plans)
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    net = nnUNetTrainerLLM.build_network_architecture(manager, config, 1, 3, True)
    assert type(net.encoder).__name__ == ("ResidualEncoder" if "ResEnc" in plans_name else "PlainConvEncoder")
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *config.patch_size))
    assert outputs[0].shape == (1, 3, *config.patch_size)
