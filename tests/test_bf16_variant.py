"""nnUNetTrainerLLM_bf16 and its random control: the frozen layer stored and run in bfloat16 whatever the source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reliability_helpers import make_trainer, random_batch
from test_network import tiny_unet

from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.llm.layer import read_layer_state_dict
from nnunetv2_llm.model.network import build_llm_unet
from nnunetv2_llm.model.spec import FROZEN_PREFIX, BottleneckSpec, LLMChoice, frozen_layer_sha256, make_spec


def test_a_float32_source_is_rounded_once_and_checksummed_as_built(tiny_llama):
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4, dtype="bfloat16"))
    assert spec.dtype == "bfloat16"
    assert make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4)).dtype == "float32"
    net = build_llm_unet(spec, tiny_unet(3))
    assert {p.dtype for p in net.bottleneck.mixer.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in net.named_parameters() if p.requires_grad} == {torch.float32}  # projections
    config = spec.hf_config()
    source = read_layer_state_dict(tiny_llama, config, 1, layer_blueprint(config))
    layer = net.bottleneck.mixer.layer.state_dict()
    assert all(torch.equal(layer[k], v.to(torch.bfloat16)) for k, v in source.items())
    assert frozen_layer_sha256(net.state_dict(), spec.dtype) == spec.layer_sha256  # what resume/predict compare
    x = torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    sum(o.float().sum() for o in net(x)).backward()
    assert torch.isfinite(x.grad).all()


def test_the_random_control_is_built_in_bfloat16(tiny_llama):
    spec = make_spec(LLMChoice("random", source=str(tiny_llama), layer=1, rank=4, dtype="bfloat16"))
    net = build_llm_unet(spec, tiny_unet(3))
    assert {p.dtype for p in net.bottleneck.mixer.parameters()} == {torch.bfloat16}


def test_the_predictors_build_takes_the_checkpoints_bfloat16_weights(tiny_llama):
    """nnU-Net's predictor rebuilds the network from plans.json alone, then loads the checkpoint's weights."""
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4, dtype="bfloat16"))
    trained = build_llm_unet(spec, tiny_unet(3))
    plans = {}
    spec.to_plans(plans)
    rebuilt = build_llm_unet(BottleneckSpec.from_plans(plans), tiny_unet(3), from_checkpoint=True)
    rebuilt.load_state_dict(trained.state_dict())
    assert frozen_layer_sha256(rebuilt.state_dict(), spec.dtype, FROZEN_PREFIX) == spec.layer_sha256


def test_an_unknown_dtype_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="dtype"):
        make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, dtype="float16"))


@pytest.mark.parametrize("name,mixer", [("nnUNetTrainerLLM_bf16", "pretrained"),
                                        ("nnUNetTrainerLLMRandom_bf16_1epoch_2iters", "random")])
def test_trainer_writes_bfloat16_into_the_plans_and_trains(workdir, tmp_path, monkeypatch, tiny_llama, name, mixer):
    trainer = make_trainer(name, workdir, tmp_path / "results", monkeypatch, tiny_llama)
    trainer.initialize()
    assert trainer.plans_manager.plans["nnunetv2_llm"]["dtype"] == "bfloat16"
    assert trainer.plans_manager.plans["nnunetv2_llm"]["mixer"] == mixer
    assert {p.dtype for p in trainer.network.bottleneck.mixer.parameters()} == {torch.bfloat16}
    # what on_train_start and a resume compare: the built bf16 layer against the checksum in the plans
    assert trainer._frozen_layer_sha256() == trainer._built_layer_sha256
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(random_batch(trainer))["loss"])
