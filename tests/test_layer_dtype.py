"""The frozen layer's storage dtype: one rule (its largest tensor's dtype), whatever the key order or sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.llm.config import load_config
from nnunetv2_llm.llm.layer import layer_storage_dtype, read_layer_state_dict, storage_dtype
from nnunetv2_llm.model.frozen_layer import FrozenLLMLayer
from nnunetv2_llm.model.spec import LLMChoice, make_spec, make_spec_and_layer


def mixed_precision_model(folder: Path, sharded: bool) -> Path:
    """A tiny Llama whose norms are stored in float32 and everything else in bfloat16 (as some checkpoints do).
    Norm keys sort first within a layer (``input_layernorm`` < ``mlp``), so a first-key rule would see float32.
    ``sharded``: the norms in their own shard, listed first in the index, the linears in a second one."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model(folder, "llama", torch_dtype="bfloat16")
    model_file = folder / "model.safetensors"
    state = {k: v.to(torch.float32 if k.endswith("norm.weight") else torch.bfloat16)
             for k, v in load_file(model_file).items()}
    if not sharded:
        save_file(state, str(model_file))
        return folder
    model_file.unlink()
    norms = {k: v for k, v in state.items() if k.endswith("norm.weight")}
    rest = {k: v for k, v in state.items() if k not in norms}
    save_file(norms, str(folder / "model-00001-of-00002.safetensors"))
    save_file(rest, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in norms},
                  **{k: "model-00002-of-00002.safetensors" for k in rest}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "norms in their own shard"])
def test_float32_norms_do_not_upcast_a_bfloat16_layer(tmp_path, sharded):
    folder = mixed_precision_model(tmp_path / "mixed", sharded)
    config = load_config(folder)
    blueprint = layer_blueprint(config)
    state = read_layer_state_dict(folder, config, 1, blueprint)
    first = next(iter(state))
    assert first.endswith("norm.weight") and state[first].dtype == torch.float32  # a norm comes first
    assert {v.dtype for v in state.values()} == {torch.float32, torch.bfloat16}

    assert storage_dtype(state) == torch.bfloat16
    assert layer_storage_dtype(folder, config, 1, blueprint) == torch.bfloat16  # the header agrees with the read
    spec, _ = make_spec_and_layer(LLMChoice("pretrained", str(folder), 1))
    assert spec.dtype == "bfloat16"
    controls = [make_spec(LLMChoice(mixer, str(folder), 1)).dtype for mixer in ("random", "identity")]
    assert controls == ["bfloat16", "bfloat16"]
    layer = FrozenLLMLayer.from_state_dict(blueprint, config, 1, state, getattr(torch, spec.dtype))
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}  # no float32 copy of the linears
    assert layer(torch.randn(1, 4, 64)).dtype == torch.bfloat16


def test_storage_dtype_ignores_key_order():
    """state: {name: tensor}; meta tensors (shape and dtype only) count like real ones."""
    state = {"input_layernorm.weight": torch.empty(64, dtype=torch.float32, device="meta"),
             "mlp.up_proj.weight": torch.empty(128, 64, dtype=torch.bfloat16, device="meta"),
             "post_attention_layernorm.weight": torch.empty(64, dtype=torch.float32, device="meta")}
    assert storage_dtype(state) == storage_dtype(dict(reversed(state.items()))) == torch.bfloat16
