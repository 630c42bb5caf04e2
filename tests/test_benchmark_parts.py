"""Pieces of ``nnunetv2_llm benchmark`` checked without running it: the analytic attention FLOPs of each layer
family, synthetic targets for region-based datasets, the refusal to overwrite an earlier report, and the
fresh-process measurement protocol."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_model

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.outputs import check_report_free, write_json_and_markdown
from nnunetv2_llm.model.network import build_mixer
from nnunetv2_llm.model.spec import LLMChoice, make_spec
from nnunetv2_llm.tools.benchmark.flops import attention_training_flops
from nnunetv2_llm.tools.benchmark.measurement import MeasurementFailed, run_measurement
from nnunetv2_llm.tools.benchmark.trainers import synthetic_batch


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_attention_flops_are_counted_for_every_family(tmp_path, model_type):
    """Forward QK^T and AV, 2 x 2 B N^2 H d, and twice that for the input gradients; 4 heads of 16 here."""
    choice = LLMChoice("pretrained", source=str(save_tiny_model(tmp_path, model_type)), layer=0, rank=4)
    mixer = build_mixer(make_spec(choice))
    assert attention_training_flops(mixer, batch=2, tokens=10) == 3 * 4 * 2 * 10 ** 2 * 4 * 16
    assert attention_training_flops(torch.nn.Identity(), batch=2, tokens=10) == 0  # the no-LLM control


def _trainer(labels: dict, regions_class_order: list[int] | None) -> SimpleNamespace:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=(8, 8, 8)), batch_size=2,
                           num_input_channels=1, label_manager=LabelManager(labels, regions_class_order),
                           enable_deep_supervision=False)


def test_synthetic_targets_of_a_region_based_dataset_fit_nnunets_loss():
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    trainer = _trainer({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, [1, 2, 3])
    target = synthetic_batch(trainer)["target"]
    assert target.shape == (2, 3, 8, 8, 8) and set(target.unique().tolist()) == {0.0, 1.0}
    assert torch.all(target[:, 0] >= target[:, 1]) and torch.all(target[:, 1] >= target[:, 2])  # nested regions
    loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    assert torch.isfinite(loss(torch.randn(2, 3, 8, 8, 8), target))


def test_synthetic_targets_of_a_label_dataset_are_label_maps():
    target = synthetic_batch(_trainer({"background": 0, "a": 1, "b": 2}, None))["target"]
    assert target.shape == (2, 1, 8, 8, 8) and set(target.unique().tolist()) == {0.0, 1.0, 2.0}


def test_an_earlier_report_is_kept_unless_overwrite(tmp_path):
    write_json_and_markdown(tmp_path, "benchmark", {"step": 1}, "first")
    with pytest.raises(LLMSettingError, match="already holds benchmark.json and benchmark.md"):
        check_report_free(tmp_path, "benchmark", overwrite=False)
    check_report_free(tmp_path, "benchmark", overwrite=True)
    check_report_free(tmp_path / "new", "benchmark", overwrite=False)
    assert not list(tmp_path.glob("*.tmp-*"))  # written through temporaries, none left


CHILD = ("import json, sys; from nnunetv2_llm.tools.benchmark.measurement import report_measurement; "
         "print('noise'); request = json.loads(sys.argv[1]); report_measurement({'twice': 2 * request['n']}); "
         "sys.exit(request.get('exit', 0))")


def test_a_measurement_in_a_fresh_process_returns_what_the_child_reported():
    assert run_measurement(["-c", CHILD], {"n": 21}) == {"twice": 42}
    with pytest.raises(MeasurementFailed) as failed:  # a result line does not hide a failing exit
        run_measurement(["-c", CHILD], {"n": 1, "exit": 3})
    assert failed.value.returncode == 3 and "noise" in failed.value.stdout
    with pytest.raises(MeasurementFailed) as failed:  # no result line
        run_measurement(["-c", "import sys; sys.stderr.write('broken')"], {})
    assert failed.value.returncode == 0 and failed.value.stderr == "broken"


# ------------------------------------------------------------------------------------------ plan presets
@pytest.mark.parametrize("preset,configuration,patch,batch,features,bottleneck", [
    # the real Hippocampus plans (40x56x40, batch 9, 4 stages; docs/FINDINGS.md) from the described dataset
    ("hippocampus", "3d_fullres", [40, 56, 40], 9, [32, 64, 128, 256], [9, 256, 5, 7, 5]),
    ("brats_3d", "3d_fullres", [128, 128, 128], 2, [32, 64, 128, 256, 320, 320], [2, 320, 4, 4, 4]),
    ("large_2d", "2d", [512, 512], 12, [32, 64, 128, 256, 512, 512, 512, 512], [12, 512, 4, 4]),
])
def test_plan_presets_are_what_nnunets_planner_makes(preset, configuration, patch, batch, features, bottleneck):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_llm.tools.benchmark.plan_presets import plan_preset
    from nnunetv2_llm.tools.benchmark.trainers import bottleneck_shape

    plans, dataset_json, description = plan_preset(preset)
    assert description.configuration == configuration and configuration in plans["configurations"]
    manager = PlansManager(plans).get_configuration(configuration)
    assert list(manager.patch_size) == patch and manager.batch_size == batch
    assert list(manager.network_arch_init_kwargs["features_per_stage"]) == features
    trainer = SimpleNamespace(configuration_manager=manager, batch_size=manager.batch_size)
    assert bottleneck_shape(trainer) == bottleneck
    assert len(dataset_json["channel_names"]) == len(description.channels)


def test_an_unknown_plan_preset_is_refused():
    from nnunetv2_llm.tools.benchmark.plan_presets import plan_preset

    with pytest.raises(LLMSettingError, match="unknown plan preset 'brats'"):
        plan_preset("brats")


# ------------------------------------------------------------------------------------------ dispatched operations
def test_the_op_counter_counts_a_linear_layer():
    """nn.Linear on a matrix is one transpose view and one addmm; its backward computes two matrix products (input
    and weight gradients) and one sum (bias gradient)."""
    from nnunetv2_llm.tools.benchmark.dispatch_counts import count_dispatched_ops, forward_backward_counts

    linear = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert count_dispatched_ops(lambda: linear(x)) == {"aten.t.default": 1, "aten.addmm.default": 1}
    counts = forward_backward_counts(linear, x)
    assert counts["forward"] == {"aten.t.default": 1, "aten.addmm.default": 1}
    assert counts["backward"]["aten.mm.default"] == 2 and counts["backward"]["aten.sum.dim_IntList"] == 1
    assert all(p.grad is None for p in linear.parameters())  # counting leaves no gradients behind


def _reference_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block's forward before its operations were cut (commit ef7235b): 3-d token tensors through each linear."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = x.float().flatten(2)
        mixed = block.mixer(block.proj_in(flat.transpose(1, 2))).float()
        out = (flat + block.proj_out(mixed).transpose(1, 2)).reshape(x.shape)
        if x.dtype in (torch.float16, torch.bfloat16):
            limit = torch.finfo(x.dtype).max
            out = out.clamp(-limit, limit)
        return out.to(x.dtype)


def _block(rank: int):
    """A block with a small frozen mixer and random (not zero) output projections, so every path carries a
    gradient."""
    from nnunetv2_llm.model.block import LLMBottleneckBlock

    torch.manual_seed(0)
    mixer = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Tanh()).requires_grad_(False)
    block = LLMBottleneckBlock(16, 24, rank, mixer)
    for p in block.proj_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block


def _outputs_and_gradients(block, forward, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    for p in block.parameters():
        p.grad = None
    out = forward(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for p in block.parameters() if p.requires_grad)]


@pytest.mark.parametrize("rank", [4, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(3, 4, 5), (6, 7)])
def test_the_block_computes_what_the_reference_computes(rank, dtype, spatial):
    block = _block(rank)
    x = torch.randn(2, 16, *spatial).to(dtype)
    grad = torch.randn(2, 16, *spatial).to(dtype)
    new = _outputs_and_gradients(block, block, x, grad)
    reference = _outputs_and_gradients(block, lambda t: _reference_forward(block, t), x, grad)
    assert len(new) == len(reference) == 2 + len([p for p in block.parameters() if p.requires_grad])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(new, reference, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("rank", [4, 0])
def test_the_block_dispatches_fewer_operations_than_the_reference(rank):
    from nnunetv2_llm.tools.benchmark.dispatch_counts import forward_backward_counts

    block = _block(rank)

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return _reference_forward(self.block, x)

    x = torch.randn(2, 16, 3, 4, 5)
    new, old = forward_backward_counts(block, x), forward_backward_counts(Reference(), x)
    assert sum(new["forward"].values()) < sum(old["forward"].values())
    assert sum(new["backward"].values()) <= sum(old["backward"].values())


def test_block_op_counts_split_the_block_from_its_mixer():
    from nnunetv2_llm.tools.benchmark.dispatch_counts import block_op_counts

    class Network(torch.nn.Module):
        def __init__(self, bottleneck):
            super().__init__()
            self.bottleneck = bottleneck

    block = _block(4)
    counts = block_op_counts(SimpleNamespace(network=Network(block)), [2, 16, 3, 4, 5], torch.device("cpu"))
    assert counts["total"] == counts["forward"] + counts["backward"] == counts["own"] + counts["mixer"]
    assert counts["mixer"] > 0 and counts["own"] > 0 and sum(counts["by_op"].values()) == counts["total"]
    assert counts["by_op"]["aten.addmm.default"] >= 3  # the mixer's linear and both projections' up maps
    assert block_op_counts(SimpleNamespace(network=torch.nn.Conv3d(1, 1, 1)), [1, 1, 2, 2, 2],
                           torch.device("cpu")) is None  # a plain U-Net has no block
