"""GGUF single-layer reading for every architecture transformers' GGUF loader maps, and every ggml type gguf can
de-quantise, on tiny files written here (``tests/gguf_files.py``)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf_files import FAMILIES, TINY, Family, permute_qk, tiny_model, to_gguf, write_gguf
from transformers import AutoConfig

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.llm.readers.gguf import gguf_supported_types, read_gguf_layer

LAYER = 1

# Architectures of transformers' GGUF mapping not read here, and why.
SKIPPED = {
    "qwen2_moe": "mixture of experts: one layer holds the experts, refused by the family rule",
    "qwen3_moe": "mixture of experts: one layer holds the experts, refused by the family rule",
    "gpt_oss": "mixture of experts: one layer holds the experts, refused by the family rule",
    "minimax_m2": "mixture of experts: one layer holds the experts, refused by the family rule",
    "mamba": "state-space model (no attention layer), refused by the family rule",
    "lfm2": "hybrid short-convolution model whose layers differ by index (GGUF stores KV heads per layer)",
    "t5": "encoder-decoder, refused by the family rule",
    "umt5": "encoder-decoder, refused by the family rule",
    "deci": "transformers has no 'deci' model class (DeciLM needs remote code)",
    "gemma4": "a tiny gemma4 cannot be written: its per-layer input embeddings (262144 x 256 per layer) keep their "
              "full-size defaults, which GGUF's mapping does not carry",
}


# transformers 5.24 builds its GGUF name map from the config's model type, which gguf does not know for a
# llama-architecture file named 'mistral' (read as model type 'mistral'); the reader maps by the file's architecture.
TRANSFORMERS_CANNOT_LOAD = {"mistral": "Unknown gguf model_type: mistral"}

# Read correctly, but refused for the bottleneck by the family rule (their layers need inputs the full model computes).
REFUSED_END_TO_END = {"bloom": "ALiBi"}


def layer_of(state: dict[str, torch.Tensor], blueprint, index: int = LAYER) -> dict[str, torch.Tensor]:
    """The tensors of layer ``index`` in a whole model's state dict, keys relative to the layer."""
    pattern = blueprint.key_pattern(index)
    return {m.group(1): tensor for key, tensor in state.items() if (m := pattern.match(key))}


def reader_inputs(path: Path):
    """The config and blueprint as the project builds them for a GGUF file."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return config, layer_blueprint(config)


def count_dequantised(monkeypatch) -> list:
    """Record every ``gguf.dequantize`` call's ggml type."""
    calls, original = [], gguf.dequantize

    def counting(data, qtype):
        calls.append(qtype)
        return original(data, qtype)

    monkeypatch.setattr(gguf, "dequantize", counting)
    return calls


def test_every_mapped_architecture_is_tested_or_skipped_for_a_reason():
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    sections = {"mistral" if f.model_type == "mistral" else f.gguf_arch for f in FAMILIES.values()}
    mapped = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}
    assert mapped == sections | set(SKIPPED), "a new transformers GGUF architecture: test it or say why not"
    assert not sections & set(SKIPPED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_equals_transformers_and_the_source_model(family, tmp_path, monkeypatch):
    """Our single layer equals the layer of transformers' whole-file load and of the model the file was written from
    (so the processors are applied: llama's Q/K order, the norm offsets, bloom's QKV, gpt2's transposes), and only
    that layer's tensors are de-quantised."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(FAMILIES[family])
    path = tmp_path / f"{family}.gguf"
    written = write_gguf(path, FAMILIES[family], model)
    config, blueprint = reader_inputs(path)
    calls = count_dequantised(monkeypatch)
    mine = read_gguf_layer(path, config, LAYER, blueprint)
    assert len(calls) == sum(name.startswith(f"blk.{LAYER}.") for name in written) < len(written)
    references = [layer_of(model.state_dict(), blueprint)]
    if family in TRANSFORMERS_CANNOT_LOAD:
        with pytest.raises(NotImplementedError, match=TRANSFORMERS_CANNOT_LOAD[family]):
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    else:
        references.append(layer_of(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
                                    .state_dict(), blueprint))
    for reference in references:
        assert mine.keys() == reference.keys() and len(mine) > 0
        assert all(torch.equal(mine[key], reference[key]) for key in mine), family


# ------------------------------------------------------------------------------------------------- ggml types
QUANT_FAMILY = Family("llama", "llama", TINY | {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2})


@pytest.fixture(scope="module")
def quant_model() -> torch.nn.Module:
    """A tiny llama whose rows hold whole blocks of every type (256 values: the K- and IQ-quants' block)."""
    return tiny_model(QUANT_FAMILY)


def test_the_usual_types_are_supported():
    usual = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "IQ4_NL", "IQ4_XS"}
    assert usual <= gguf_supported_types()


@pytest.mark.parametrize("qtype", sorted(gguf_supported_types()))
def test_every_dequantisable_type_reads_exactly(qtype, quant_model, tmp_path):
    """Layer 1's weights stored as ``qtype`` (gguf's quantiser, or random valid blocks): each tensor we return is
    ``gguf.dequantize`` of its stored bytes, processed (Q and K back in HF row order)."""
    qtype = GGMLQuantizationType[qtype]
    path = tmp_path / f"{qtype.name}.gguf"
    written = write_gguf(path, QUANT_FAMILY, quant_model,
                         qtype_of=lambda name: qtype if name.startswith(f"blk.{LAYER}.") else GGMLQuantizationType.F32)
    stored = {name: data for name, (data, kind) in written.items() if name.startswith(f"blk.{LAYER}.")}
    matrices = [name for name, data in stored.items() if data.ndim == 2]  # q, k, v, o, gate, up, down
    assert len(matrices) == 7 and all(written[name][1] == qtype for name in matrices)
    config, blueprint = reader_inputs(path)
    mine = read_gguf_layer(path, config, LAYER, blueprint)
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                  "post_attention_layernorm": "ffn_norm"}
    assert len(mine) == len(hf_to_gguf)
    for key, tensor in mine.items():
        name = f"blk.{LAYER}.{hf_to_gguf[key.removesuffix('.weight')]}.weight"
        kind = written[name][1]
        expected = gguf.dequantize(stored[name], kind).reshape(tensor.shape)
        assert np.array_equal(to_gguf("llama", config, name, tensor.numpy()), expected), (qtype.name, key)


def test_llama_qk_permutation_is_undone():
    """The test's own permutation is llama.cpp's: transformers' processor inverts it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(processor.process(permute_qk(weights, 2), "blk.0.attn_k.weight").weights, weights)
    assert not np.array_equal(permute_qk(weights, 2), weights)


@pytest.mark.parametrize("qtype", sorted({t.name for t in GGMLQuantizationType} - gguf_supported_types()))
def test_a_type_gguf_cannot_dequantise_is_refused_in_one_line(qtype, quant_model, tmp_path):
    qtype = GGMLQuantizationType[qtype]
    path = tmp_path / f"{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor(f"blk.{LAYER}.ffn_up.weight", np.zeros((4, 256 // block * size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    blueprint = layer_blueprint(quant_model.config)
    with pytest.raises(LLMSettingError) as error:
        read_gguf_layer(path, quant_model.config, LAYER, blueprint)
    message = str(error.value)
    assert "\n" not in message and f"'blk.{LAYER}.ffn_up.weight'" in message and f"stored as {qtype.name}," in message


def test_an_architecture_only_transformers_packed_loader_reads_is_refused(quant_model, tmp_path):
    path = tmp_path / "qwen35.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen35")
    writer.add_tensor(f"blk.{LAYER}.attn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LLMSettingError, match="GGUF architecture 'qwen35'.*packed GGUF loader only"):
        read_gguf_layer(path, quant_model.config, LAYER, layer_blueprint(quant_model.config))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_make_spec_and_layer_reads_the_gguf_layer(family, tmp_path):
    """The whole path (config, family rule, layer read and checks) on a GGUF of several architectures."""
    from nnunetv2_llm.model.spec import LLMChoice, make_spec_and_layer

    model = tiny_model(FAMILIES[family])
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, FAMILIES[family], model)
    choice = LLMChoice("pretrained", source=str(path), layer=LAYER)
    if family in REFUSED_END_TO_END:
        with pytest.raises(LLMSettingError, match=f"is not supported.*{REFUSED_END_TO_END[family]}"):
            make_spec_and_layer(choice)
        return
    spec, state = make_spec_and_layer(choice)
    assert (spec.source_format, spec.layer, spec.model_type) == ("gguf", LAYER, model.config.model_type)
    reference = layer_of(model.state_dict(), layer_blueprint(model.config))
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[key].float(), reference[key]) for key in state)
