"""activation-maps on a tiny, untrained model folder written in nnU-Net's format (no training)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_llm.cli import main as cli_main
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import FIXTURE
from nnunetv2_llm.tools.activation_maps.compute import (
    bottleneck_of,
    choose_window,
    compute_activation_maps,
    load_predictor,
    pad_to,
    to_preprocessed_index,
)
from nnunetv2_llm.tools.activation_maps.figure import plot_activation_maps

IMAGE = FIXTURE / "imagesTr" / "hippocampus_001.nii.gz"  # array (35, 51, 35), 1 mm voxels
FEATURES = [4, 8, 16]
PATCH_3D, PATCH_2D = [16, 24, 16], [24, 16]  # total stride 4 -> bottleneck 4x6x4 / 6x4


def architecture(dim: int) -> dict:
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3, "features_per_stage": FEATURES, "conv_op": conv,
            "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def configuration(dim: int) -> dict:
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"tiny_{dim}d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": PATCH_3D if dim == 3 else PATCH_2D, "median_image_size_in_voxels": [36, 50, 36][-dim:],
        "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": architecture(dim), "batch_dice": dim == 2,
    }


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-layer random Llama with hidden size 64, saved as a safetensors model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llm")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_model_folder(root: Path, llm: Path, configuration_name: str = "3d_fullres",
                      proj_out_scale: float = 0.0) -> Path:
    """nnUNet_results-style trainer folder: plans.json (with the nnunetv2_llm block), dataset.json and
    fold_0/checkpoint_final.pth holding the weights nnU-Net's predictor reads."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_llm.model.spec import LLMChoice, make_spec
    from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM

    folder = root / "Dataset004_Hippocampus" / f"nnUNetTrainerLLM__nnUNetPlans__{configuration_name}"
    (folder / "fold_0").mkdir(parents=True)
    plans = {
        "dataset_name": "Dataset004_Hippocampus", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [36, 50, 36],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration(3), "2d": configuration(2)},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1228.8, "mean": 390.4, "median": 381.4, "min": 17.9, "percentile_00_5": 39.0,
            "percentile_99_5": 914.9, "std": 169.3}},
    }
    make_spec(LLMChoice("pretrained", source=str(llm), layer=-1, rank=8)).to_plans(plans)
    dataset_json = {"labels": {"background": 0, "Anterior": 1, "Posterior": 2}, "channel_names": {"0": "MRI"},
                    "numTraining": 3, "file_ending": ".nii.gz", "name": "Hippocampus"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    manager = PlansManager(plans)
    torch.manual_seed(1)
    network = nnUNetTrainerLLM.build_network_architecture(
        manager, manager.get_configuration(configuration_name), 1, 3, enable_deep_supervision=False)
    if proj_out_scale:
        torch.nn.init.normal_(network.bottleneck.proj_out.up.weight, std=proj_out_scale)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainerLLM",
                "init_args": {"configuration": configuration_name, "fold": 0},
                "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def test_zero_init_block_is_identity_and_figure_is_written(tmp_path, tiny_llm):
    folder = make_model_folder(tmp_path, tiny_llm)
    result = compute_activation_maps(folder, [str(IMAGE)], slice_axis=0, slice_index=17)
    bottleneck = [p // 4 for p in PATCH_3D]
    assert result.before.shape == (FEATURES[-1], *bottleneck)
    assert result.after.shape == result.before.shape
    assert np.array_equal(result.before, result.after)  # zero-initialised proj_out: the block is the identity
    assert result.relative_change == 0.0
    assert result.original_slice == (0, 17)
    assert result.image_slice.shape == result.maps["before"].shape == result.segmentation_slice.shape
    # maps cover the analysed window only (the image is larger than the patch in-plane)
    inside = np.isfinite(result.maps["before"])
    (h0, h1), (w0, w1) = result.window[1], result.window[2]
    assert inside[h0:h1, w0:w1].all() and inside.sum() == (h1 - h0) * (w1 - w0)
    assert np.nanmax(result.maps["change"]) == 0.0
    assert result.meta["llm_layer"] == "1" and result.meta["mixer"] == "pretrained"

    out = plot_activation_maps(result, tmp_path / "figs" / "act.png")
    import matplotlib.image

    png = matplotlib.image.imread(out)
    assert png.ndim == 3 and png.shape[1] > 2 * png.shape[0]  # four panels side by side


def test_nonzero_proj_out_changes_the_features_by_the_block_residual(tmp_path, tiny_llm):
    folder = make_model_folder(tmp_path, tiny_llm, proj_out_scale=0.5)
    env_before = os.environ.get("nnUNet_extTrainer")
    predictor = load_predictor(folder, "0")
    assert os.environ.get("nnUNet_extTrainer") == env_before  # set for nnU-Net's lookup, then restored
    result = compute_activation_maps(folder, [str(IMAGE)], slice_axis=1, predictor=predictor)
    assert result.before.shape == (FEATURES[-1], *[p // 4 for p in PATCH_3D])
    assert not np.allclose(result.before, result.after)
    assert result.relative_change > 0 and np.nanmax(result.maps["change"]) > 0
    # the hook captured the block's real input and output: applying the block to `before` gives `after`
    block = bottleneck_of(predictor.network)
    with torch.no_grad():
        again = block(torch.from_numpy(result.before)[None])[0].numpy()
    np.testing.assert_allclose(again, result.after, rtol=1e-4, atol=1e-5)
    # the loaded weights are the checkpoint's (not a fresh zero-initialised block)
    assert block.proj_out.up.weight.abs().sum() > 0
    result_l2 = compute_activation_maps(folder, [str(IMAGE)], reduction="l2", region="whole", predictor=predictor)
    assert result_l2.meta["region"] == "whole"
    assert np.isfinite(result_l2.maps["after"]).all()  # the whole slice is covered


def test_2d_configuration(tmp_path, tiny_llm):
    folder = make_model_folder(tmp_path, tiny_llm, configuration_name="2d", proj_out_scale=0.5)
    result = compute_activation_maps(folder, [str(IMAGE)], slice_axis=0, slice_index=10)
    assert result.before.shape == (FEATURES[-1], *[p // 4 for p in PATCH_2D])
    assert not np.allclose(result.before, result.after)
    with pytest.raises(LLMSettingError, match="2d configuration"):
        compute_activation_maps(folder, [str(IMAGE)], slice_axis=2)


def test_refuses_a_model_folder_without_the_llm_block(tmp_path, tiny_llm):
    folder = make_model_folder(tmp_path, tiny_llm)
    plans = json.loads((folder / "plans.json").read_text())
    plans.pop("nnunetv2_llm")
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(LLMSettingError, match="not trained with an nnunetv2_llm trainer"):
        compute_activation_maps(folder, [str(IMAGE)])


def test_cli_and_input_errors(tmp_path, tiny_llm, capsys):
    folder = make_model_folder(tmp_path, tiny_llm, proj_out_scale=0.5)
    out, arrays = tmp_path / "act.png", tmp_path / "act.npz"
    assert cli_main(["activation-maps", "-m", str(folder), "-f", "0", "-i", str(IMAGE), "-o", str(out),
                     "--slice-axis", "2", "--slice", "20", "--upsample", "nearest", "--save-arrays",
                     str(arrays)]) == 0
    assert out.is_file() and out.stat().st_size > 10_000
    saved = np.load(arrays)
    assert saved["before"].shape == saved["after"].shape == (FEATURES[-1], *[p // 4 for p in PATCH_3D])
    assert json.loads(str(saved["meta"]))["case"] == "hippocampus_001"
    capsys.readouterr()
    for argv, message in [
        (["-f", "1"], "no checkpoint"),
        (["--slice", "999"], "out of range"),
        (["--slice-axis", "3"], "--slice-axis must be"),
    ]:
        assert cli_main(["activation-maps", "-m", str(folder), "-i", str(IMAGE), "-o", str(out), *argv]) == 2
        assert message in capsys.readouterr().err
    missing = tmp_path / "nope.nii.gz"
    assert cli_main(["activation-maps", "-m", str(folder), "-i", str(missing), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_geometry_helpers():
    assert choose_window((35, 52, 34), (16, 24, 16), (17, 26, 17)) == [(9, 25), (14, 38), (9, 25)]
    assert choose_window((35, 52, 34), (16, 24, 16), (0, 51, 17)) == [(0, 16), (28, 52), (9, 25)]
    assert choose_window((10, 52), (16, 24), (5, 26)) == [(0, 10), (14, 38)]
    padded, before = pad_to(np.ones((1, 10, 24)), (16, 24))
    assert padded.shape == (1, 16, 24) and before == [3, 0] and padded[0, 3:13].all() and not padded[0, :3].any()
    props = {"bbox_used_for_cropping": [[5, 25]], "shape_before_cropping": [30]}
    assert to_preprocessed_index(5, 0, props, 40) == 1 and to_preprocessed_index(24, 0, props, 40) == 39
    with pytest.raises(LLMSettingError, match="outside the region"):
        to_preprocessed_index(2, 0, props, 40)
    with pytest.raises(LLMSettingError, match="out of range"):
        to_preprocessed_index(30, 0, props, 40)
