"""Tiny GGUF files written in tests from tiny random Hugging Face models, the way llama.cpp's converter writes them.

``write_gguf`` stores a model's config as GGUF metadata (the inverse of transformers' ``GGUF_CONFIG_MAPPING``) and
its tensors under GGUF names (the inverse of ``get_gguf_hf_weights_map``), with the inverse of transformers' tensor
processors applied (``to_gguf``: llama's Q/K permutation, the norm offset of gemma and nemotron, bloom's fused QKV
layout, gpt2's transposed linears). Tensors can be stored in any ggml type: quantised with ``gguf.quants.quantize``
where gguf implements it, else random but valid blocks (``random_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

# Tiny sizes that GGUF's metadata can express: a size the mapping does not carry keeps its config-class default.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 32, "max_position_embeddings": 64, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Family:
    """One GGUF architecture: the transformers model type it loads as and a tiny config for it."""

    gguf_arch: str  # general.architecture
    model_type: str  # transformers' model type
    config: dict = field(default_factory=dict)  # AutoConfig.for_model keyword arguments
    name: str | None = None  # general.name (llama.cpp writes Mistral as 'llama' named after the model)


FAMILIES = {
    "llama": Family("llama", "llama", TINY),
    "mistral": Family("llama", "mistral", TINY | {"head_dim": 16}, name="mistral"),
    "qwen2": Family("qwen2", "qwen2", TINY),
    "qwen3": Family("qwen3", "qwen3", TINY | {"head_dim": 128}),  # head_dim is not in Qwen3's GGUF mapping
    "gemma2": Family("gemma2", "gemma2", TINY | {"head_dim": 16}),
    "gemma3": Family("gemma3", "gemma3_text", TINY | {"head_dim": 16}),
    "phi3": Family("phi3", "phi3", TINY),
    "stablelm": Family("stablelm", "stablelm", TINY),
    "starcoder2": Family("starcoder2", "starcoder2", TINY),
    "nemotron": Family("nemotron", "nemotron", TINY | {"head_dim": 16}),
    "falcon": Family("falcon", "falcon", {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                          "vocab_size": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "bloom": Family("bloom", "bloom", {"hidden_size": 64, "n_layer": 3, "n_head": 4, "vocab_size": 32,
                                       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    # gpt2's GGUF context length sets n_ctx, not n_positions (the position table): that stays 1024
    "gpt2": Family("gpt2", "gpt2", {"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 32, "bos_token_id": 1,
                                    "eos_token_id": 2}),
}


def tiny_model(family: Family, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random ``*ForCausalLM`` of ``family`` (float32); every weight random, norms included, so that a wrong
    offset or permutation shows, and a multiple of 1/128 below 8, so that llama.cpp's norm offset (+1) and
    transformers' (-1) give it back exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, **(family.config | overrides))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.round(torch.randn_like(parameter) * 64) / 128)
    return model


# ------------------------------------------------------------------------------------------- HF -> GGUF values
def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its converter's ``permute``); shape kept: ``(rows, cols)`` or ``(rows,)``."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _bloom_qkv(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Bloom's per-head interleaved QKV ``(3 * hidden, ...)`` as llama.cpp's [Q; K; V] blocks."""
    per_head = weights.reshape(n_head, 3, weights.shape[0] // n_head // 3, *weights.shape[1:])
    return np.concatenate([per_head[:, i].reshape(-1, *weights.shape[1:]) for i in range(3)])


def to_gguf(gguf_arch: str, config, gguf_name: str, weights: np.ndarray) -> np.ndarray:
    """The inverse of transformers' tensor processor for ``gguf_arch``: an HF tensor as llama.cpp stores it."""
    if gguf_arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        kv = config.num_key_value_heads if ".attn_k." in gguf_name else config.num_attention_heads
        return permute_qk(weights, kv)
    if gguf_arch in ("gemma2", "gemma3", "nemotron") and "norm.weight" in gguf_name:
        return weights + 1
    if gguf_arch == "bloom" and "attn_qkv" in gguf_name:
        return _bloom_qkv(weights, config.n_head)
    if gguf_arch == "gpt2" and any(f"{n}.weight" in gguf_name for n in ("attn_qkv", "ffn_down", "ffn_up",
                                                                          "attn_output")):
        return np.ascontiguousarray(weights.T)
    return weights


# ------------------------------------------------------------------------------------------------ ggml types
def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random bytes of ``qtype`` for a ``shape`` tensor, ``(rows, cols // block * block_bytes)`` uint8; a block whose
    values would not be finite (a random float16 scale can be Inf or NaN) is drawn again."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # the Inf/NaN scales being drawn again
        while not (finite := np.isfinite(gguf.dequantize(blocks, qtype)).all(axis=1)).all():
            blocks[~finite] = rng.integers(0, 256, ((~finite).sum(), size), dtype=np.uint8)
    return blocks.reshape(shape[0], -1)


def encode(weights: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """``weights`` stored as ``qtype``: quantised by gguf where it can, else random valid blocks of that type."""
    if qtype == GGMLQuantizationType.F32:
        return weights.astype(np.float32)
    try:
        return gguf.quants.quantize(weights, qtype)
    except NotImplementedError:
        return random_blocks(qtype, weights.shape, rng)


def quantisable(gguf_name: str, weights: np.ndarray, qtype: GGMLQuantizationType) -> bool:
    """A 2-D weight whose rows split into whole blocks of ``qtype`` (llama.cpp keeps norms and biases in F32)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return weights.ndim == 2 and gguf_name.endswith(".weight") and weights.shape[1] % block == 0


# ----------------------------------------------------------------------------------------------------- writer
def gguf_tensors(model: torch.nn.Module, gguf_arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under their GGUF names, as llama.cpp stores them (float32, before any quantisation)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = model.config
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    hf_to_gguf = {hf: name for name, hf in get_gguf_hf_weights_map(model, processor, model_type=gguf_arch).items()}
    state = model.state_dict()
    unmapped = state.keys() - hf_to_gguf.keys() - {"lm_head.weight"}
    if unmapped:
        raise ValueError(f"no GGUF name for {sorted(unmapped)}")
    tied = config.tie_word_embeddings or gguf_arch in ("bloom", "falcon")  # transformers ties these two always
    tensors = {}
    for hf_name, tensor in state.items():
        name = hf_to_gguf.get(hf_name, "output.weight")
        if not (name == "output.weight" and tied):
            tensors[name] = to_gguf(gguf_arch, config, name, tensor.float().numpy())
    return tensors


def _metadata(writer: gguf.GGUFWriter, family: Family, config) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if family.name:
        writer.add_name(family.name)
    section = "mistral" if family.model_type == "mistral" else family.gguf_arch
    for key, hf_key in GGUF_CONFIG_MAPPING[section].items():
        value = getattr(config, hf_key, None) if isinstance(hf_key, str) else None
        if isinstance(value, bool) or value is None:
            continue
        full_key = f"{family.gguf_arch}.{key}"
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(full_key, value)
    # transformers reads the vocabulary size from the token list where the mapping has no vocab_size
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for key in ("bos", "eos", "pad"):
        token = getattr(config, f"{key}_token_id", None)
        if isinstance(token, int):
            writer.add_uint32(f"tokenizer.ggml.{'padding' if key == 'pad' else key}_token_id", token)


def write_gguf(path: Path, family: Family, model: torch.nn.Module,
               qtype_of: Callable[[str], GGMLQuantizationType] = lambda name: GGMLQuantizationType.F32,
               seed: int = 0) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """Write ``model`` as a GGUF file of ``family``; ``qtype_of(gguf_name)`` picks each quantisable tensor's type.

    Returns:
        ``{gguf_name: (stored array, ggml type)}``: what was written (float32 values, or uint8 block bytes
        ``(rows, cols // block * block_bytes)``).
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), family.gguf_arch)
    _metadata(writer, family, model.config)
    written = {}
    for name, weights in gguf_tensors(model, family.gguf_arch).items():
        qtype = qtype_of(name)
        qtype = qtype if quantisable(name, weights, qtype) else GGMLQuantizationType.F32
        stored = encode(weights, qtype, rng)
        written[name] = (stored, qtype)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
