"""``nnunetv2_llm benchmark`` runs end to end on a tiny case and reports consistent numbers (never timings)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_llm.llm import synthetic as synthetic_llm

DATASET = "Dataset990_BenchTiny"
PATCH = [16, 16, 16]
ARCH_KWARGS = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def _plans() -> dict:
    """A Hippocampus-like 3d_fullres plan, shrunk: 3 stages of 4/8/16 features, 16^3 patches, batch 2."""
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [20, 20, 20], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": PATCH, "median_image_size_in_voxels": [20.0] * 3, "spacing": [1.0] * 3,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resample, "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": ARCH_KWARGS,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 10.0, "mean": 0.0, "median": 0.0, "min": -10.0, "percentile_00_5": -3.0, "percentile_99_5": 3.0,
            "std": 1.0}},
    }


def make_tiny_preprocessed(root: Path, n_cases: int = 5) -> Path:
    """nnUNet_preprocessed with a tiny two-label dataset in nnU-Net's npz format."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    base = root / DATASET
    folder = base / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    (base / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    (base / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": n_cases,
        "file_ending": ".nii.gz"}))
    (base / "dataset_fingerprint.json").write_text("{}")
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        shape = (20, 18, 21)
        data = rng.standard_normal((1, *shape)).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int8)
        seg[0, 5:12, 4:10, 6:14] = 1
        seg[0, 12:16, 8:14, 3:9] = 2
        locations = {label: np.argwhere(seg == label).astype(np.int64) for label in (1, 2)}
        properties = {"spacing": [1.0] * 3, "shape_before_cropping": shape,
                      "shape_after_cropping_and_before_resampling": shape,
                      "bbox_used_for_cropping": [[0, s] for s in shape], "class_locations": locations}
        nnUNetDatasetNumpy.save_case(data, seg, properties, str(folder / f"case_{i:03d}"))
    with open(folder / "case_000.pkl", "rb") as f:
        assert "class_locations" in pickle.load(f)
    return root


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def benchmark_run(bench_dir):
    tmp = bench_dir
    preprocessed = make_tiny_preprocessed(tmp / "nnUNet_preprocessed")
    source = synthetic_llm.write_synthetic_checkpoint(tmp / "tiny_llama", "tiny-llama", shard_bytes=40_000)
    out = tmp / "out"
    (tmp / "tmpdir").mkdir()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "nnUNet_preprocessed": str(preprocessed),
           "TMPDIR": str(tmp / "tmpdir")}
    env.pop("nnUNet_LLM_LAYER", None)
    cmd = [sys.executable, "-m", "nnunetv2_llm.cli", "benchmark", "-d", DATASET, "-c", "3d_fullres", "--device", "cpu",
           "-tr", "nnUNetTrainer", "nnUNetTrainerLLM", "nnUNetTrainerLLMNoLLM", "--llm-source", str(source),
           "--iterations", "2", "--warmup", "1", "--batches", "2", "--inference-cases", "2",
           "--inference-repeats", "1", "--memory-steps", "1", "--compile", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text(), proc.stdout


def _benchmark_temp_folders(tmpdir: Path) -> list[str]:
    return [p.name for p in tmpdir.iterdir() if p.name.startswith("nnunetv2_llm_benchmark")]


def test_leaves_no_trainer_logs_behind(benchmark_run, bench_dir):
    """The trainers' logs go to a temporary nnUNet_results (in $TMPDIR), which is removed when the benchmark ends."""
    assert not _benchmark_temp_folders(bench_dir / "tmpdir")


def test_a_bad_setting_stops_it_without_leftovers(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    cmd = [sys.executable, "-m", "nnunetv2_llm.cli", "benchmark", "-d", DATASET, "--iterations", "0",
           "--output", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--iterations must be at least 1" in proc.stderr + proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not _benchmark_temp_folders(tmp_path) and not (tmp_path / "out").exists()


def test_writes_json_and_markdown(benchmark_run):
    results, markdown, stdout = benchmark_run
    assert results["trainers"] == ["nnUNetTrainer", "nnUNetTrainerLLM", "nnUNetTrainerLLMNoLLM"]
    assert results["plan"]["patch_size"] == PATCH and results["plan"]["batch_size"] == 2
    for name in results["trainers"]:
        assert f"| {name} |" in markdown
    assert markdown in stdout  # the table is printed as well
    verdict = next(line for line in markdown.splitlines() if line.startswith("- nnUNetTrainerLLM: step"))
    assert verdict.endswith("(a GPU target)")  # the floor target is judged on CUDA only


def test_reports_whether_the_network_ran_compiled(benchmark_run):
    """--compile asks nnU-Net to compile; on the CPU nnU-Net does not (``_do_i_compile``), and the report says so."""
    results, markdown, _ = benchmark_run
    assert results["settings"]["compile_requested"] is True
    assert not any(row["compiled"] for row in results["results"].values())
    assert "torch.compile off (requested, but not used" in markdown


def test_ratios_are_quotients_of_the_reported_medians(benchmark_run):
    results = benchmark_run[0]
    rows = results["results"]
    base = rows["nnUNetTrainer"]
    assert base["step_ratio"] == pytest.approx(1.0) and base["inference_ratio"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["step_s"]["n"] == 2 and row["inference_s"]["n"] == 1
        assert row["step_s"]["median"] == pytest.approx(float(np.median(row["step_times_s"])))
        assert row["inference_s"]["median"] == pytest.approx(float(np.median(row["inference_times_s"])))
        assert row["step_s"]["min"] <= row["step_s"]["median"] <= row["step_s"]["max"]
        assert row["step_ratio"] == pytest.approx(row["step_s"]["median"] / base["step_s"]["median"])
        assert row["inference_ratio"] == pytest.approx(row["inference_s"]["median"] / base["inference_s"]["median"])
        assert row["step_extra_s"] == pytest.approx(row["step_s"]["median"] - base["step_s"]["median"])
        assert np.isfinite(row["last_loss"])
        assert row["flops"]["ratio"] == pytest.approx(row["flops"]["total"] / base["flops"]["total"])


def test_parameter_counts_match_the_networks(benchmark_run):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunetv2_llm.model.spec import LLMChoice, make_spec

    rows = benchmark_run[0]["results"]
    torch.manual_seed(0)
    unet = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", ARCH_KWARGS,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 3, deep_supervision=True)
    unet_params = sum(p.numel() for p in unet.parameters())
    assert rows["nnUNetTrainer"]["params"]["trainable"] == unet_params
    assert rows["nnUNetTrainer"]["params"]["frozen"] == 0

    source = rows["nnUNetTrainerLLM"]["llm"]["source"]
    spec = make_spec(LLMChoice("pretrained", source))
    layer = synthetic_llm.layer_shapes(synthetic_llm.PRESETS["tiny-llama"])
    layer_numel = sum(int(np.prod(s)) for s in layer.values())
    width, channels, rank = spec.width, ARCH_KWARGS["features_per_stage"][-1], spec.rank
    projections = (channels * rank + rank * width + width) + (width * rank + rank * channels + channels)
    llm = rows["nnUNetTrainerLLM"]["params"]
    assert llm["frozen"] == layer_numel == llm["llm_layer_params"]
    assert llm["frozen_bytes"] == 2 * layer_numel  # bfloat16 source stays bfloat16
    assert llm["trainable"] == unet_params + projections
    no_llm = rows["nnUNetTrainerLLMNoLLM"]["params"]
    assert no_llm["frozen"] == 0 and no_llm["trainable"] == unet_params + projections


def test_flops_and_memory_are_consistent(benchmark_run):
    results = benchmark_run[0]
    rows = results["results"]
    llm, no_llm, base = rows["nnUNetTrainerLLM"], rows["nnUNetTrainerLLMNoLLM"], rows["nnUNetTrainer"]
    bottleneck = [2, 16, 4, 4, 4]  # batch 2, 16 channels, 16^3 patch / 4
    assert llm["flops"]["bottleneck_shape"] == bottleneck
    assert llm["flops"]["tokens_per_step"] == 2 * 4 * 4 * 4
    assert 0 < llm["flops"]["llm_layer"] < llm["flops"]["block"] < llm["flops"]["total"]
    assert no_llm["flops"]["llm_layer"] == 0 and base["flops"]["block"] == 0
    # the layer's FLOPs in a training step: forward + input gradients = 4 x linear params x tokens + attention
    shapes = synthetic_llm.layer_shapes(synthetic_llm.PRESETS["tiny-llama"])
    linear = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)
    tokens = llm["flops"]["tokens_per_step"]
    attention = 3 * 4 * 2 * (tokens // 2) ** 2 * 4 * 16  # batch 2, 4 heads of 16
    assert llm["flops"]["llm_layer"] == pytest.approx(4 * linear * tokens + attention, rel=0.01)  # + rotary
    assert llm["floor_extra_s"] == pytest.approx(
        llm["flops"]["llm_layer"] / results["matmul_rates"]["bfloat16"]["peak_flops_per_s"])
    for name, row in rows.items():
        mem = row["memory"]
        assert "error" not in mem, mem
        assert mem["peak_rss"] >= mem["rss_after_build"] >= mem["rss_after_imports"] > 0
        if name != "nnUNetTrainer":
            assert mem["peak_rss_overhead"] == mem["peak_rss"] - base["memory"]["peak_rss"]
            assert mem["rss_after_build_overhead"] == mem["rss_after_build"] - base["memory"]["rss_after_build"]
    # the pre-trained layer's memory against the no-LLM control: reported for it, and only for it
    over = llm["memory"]["rss_after_build_over_no_llm_control"]
    assert over == llm["memory"]["rss_after_build"] - no_llm["memory"]["rss_after_build"]
    assert not any(k.endswith("_over_no_llm_control") for k in no_llm["memory"])
    assert f"after building {over / 2 ** 20:+.1f} MiB" in benchmark_run[1]


def test_verdicts_follow_the_confidence_interval():
    from nnunetv2_llm.tools.benchmark.timing import verdict

    def paired(low, high):
        return {"median": (low + high) / 2, "ci95": [low, high]}

    assert verdict(1.03, paired(1.01, 1.04), 1.05).endswith(" ok")
    assert verdict(1.07, paired(1.06, 1.09), 1.05).endswith(" OVER")
    assert verdict(1.03, paired(1.02, 1.08), 1.05).endswith(" undecided")  # the ratio alone would say ok
    assert verdict(1.06, {"median": 1.06, "ci95": None}, 1.05) == "1.060 OVER (too few rounds for a CI)"


def test_synthetic_checkpoint_is_sharded_and_readable(tmp_path):
    from nnunetv2_llm.llm.blueprint import layer_blueprint
    from nnunetv2_llm.llm.config import load_config
    from nnunetv2_llm.llm.layer import read_layer_state_dict

    folder = synthetic_llm.write_synthetic_checkpoint(tmp_path / "m", "tiny-llama", shard_bytes=30_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((folder / shard).is_file() for shard in set(index["weight_map"].values()))
    config = load_config(folder)
    state = read_layer_state_dict(folder, config, 1, layer_blueprint(config))
    expected = synthetic_llm.layer_shapes(synthetic_llm.PRESETS["tiny-llama"])
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert synthetic_llm.layer_numel("llama-8b") == 218_112_000  # Llama-3.1-8B: 218M parameters per layer


def test_block_operations_and_flop_shares_are_reported(benchmark_run):
    results, markdown, _ = benchmark_run
    rows = results["results"]
    assert results["plan"]["bottleneck_shape"] == rows["nnUNetTrainerLLM"]["flops"]["bottleneck_shape"]
    assert "block_ops" not in rows["nnUNetTrainer"]  # no block
    for name in ("nnUNetTrainerLLM", "nnUNetTrainerLLMNoLLM"):
        ops = rows[name]["block_ops"]
        assert ops["total"] == ops["forward"] + ops["backward"] == ops["own"] + ops["mixer"] > 0
        assert sum(ops["by_op"].values()) == ops["total"]
        assert f"- {name}: the LLM block dispatches {ops['total']} operations per training step" in markdown
    assert rows["nnUNetTrainerLLMNoLLM"]["block_ops"]["mixer"] == 0 < rows["nnUNetTrainerLLM"]["block_ops"]["mixer"]
    flops = rows["nnUNetTrainerLLM"]["flops"]
    assert flops["block_share"] == pytest.approx(flops["block"] / flops["total"])
    assert f"({flops['block_share']:.4f} of the network's)" in markdown
