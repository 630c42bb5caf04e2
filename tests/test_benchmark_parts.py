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
