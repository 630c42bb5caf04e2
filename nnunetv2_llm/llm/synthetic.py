"""Synthetic LLM checkpoints: real model shapes, random weights, written as a sharded safetensors folder.

Used to measure what a large layer costs (step time, memory, loading) without downloading a model:
``synthetic:llama-8b`` has Llama-3.1-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
bfloat16), written the way Hugging Face writes checkpoints (``model-0000i-of-0000N.safetensors`` shards plus
``model.safetensors.index.json``, ``config.json`` in Meta's format). Weights are random (linear weights
~ N(0, 0.02), norms 1): fine for timing and memory, meaningless for accuracy.

A folder is written once and reused (a ``.complete`` marker is written last, so an interrupted write is redone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used
    import torch

SYNTHETIC_PREFIX = "synthetic:"

_LLAMA3_ROPE_8B = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA3_ROPE_1B = {**_LLAMA3_ROPE_8B, "factor": 32.0}

# config.json of each preset, as the published models have them (num_hidden_layers is set at write time).
PRESETS: dict[str, dict] = {
    "llama-8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE_8B, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "llama-1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE_1B, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": True, "initializer_range": 0.02, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "bfloat16",
    },
    "tiny-llama": {  # for tests: the same code paths in kilobytes
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    },
}


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names (relative to the layer) and shapes of one Llama decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def checkpoint_shapes(config: dict, embeddings: bool = True) -> dict[str, tuple[int, ...]]:
    """All tensors of the checkpoint in Hugging Face order (embeddings, layers, final norm, head)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if embeddings:
        shapes["model.embed_tokens.weight"] = (config["vocab_size"], config["hidden_size"])
    for k in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{k}.{name}": s for name, s in layer_shapes(config).items()})
    if embeddings:
        shapes["model.norm.weight"] = (config["hidden_size"],)
        if not config.get("tie_word_embeddings"):
            shapes["lm_head.weight"] = (config["vocab_size"], config["hidden_size"])
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_synthetic_checkpoint(folder: str | os.PathLike, preset: str = "llama-8b", num_layers: int | None = None,
                               embeddings: bool = True, shard_bytes: int = 2 * 1024 ** 3, seed: int = 0) -> Path:
    """Write ``preset``'s shapes with random bfloat16 weights as a sharded safetensors folder.

    num_layers: how many decoder layers to write (default: the preset's count); ``config.json`` says the same,
    so the folder is a complete, loadable model. embeddings=False leaves out embeddings, final norm and head
    (enough for single-layer reads, not for ``from_pretrained``). Shards are cut at ``shard_bytes`` as
    ``save_pretrained(max_shard_size=...)`` cuts them. Memory: at most one shard of tensors at a time.
    """
    import torch
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset '{preset}'; known: {', '.join(PRESETS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(PRESETS[preset])
    if num_layers is not None:
        config["num_hidden_layers"] = int(num_layers)
    shapes = checkpoint_shapes(config, embeddings)
    itemsize = 2  # bfloat16

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    generator = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    weight_map = {}
    for n, names in enumerate(shards, start=1):
        shard_name = (f"model-{n:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                      else "model.safetensors")
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator, dtype=torch.float32)
                                 .mul_(std).to(torch.bfloat16)) if _numel(shape) < 2 ** 26 else \
                    _randn_bf16_chunked(shape, std, generator)
            weight_map[name] = shard_name
        save_file(tensors, str(folder / shard_name), metadata={"format": "pt"})
        del tensors
    total = sum(_numel(s) * itemsize for s in shapes.values())
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "SYNTHETIC.txt").write_text(
        f"Synthetic checkpoint: {preset} shapes, {config['num_hidden_layers']} layers, random bfloat16 weights "
        f"(seed {seed}), embeddings {'included' if embeddings else 'left out'}. For timing and memory only.\n")
    return folder


def _randn_bf16_chunked(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Large random bfloat16 tensor without a full float32 intermediate (keeps peak memory at the output)."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 2 ** 24
    for start in range(0, flat.numel(), step):
        stop = min(start + step, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=generator).mul_(std).to(torch.bfloat16)
    return out


def layer_nbytes(preset: str) -> int:
    """Bytes of one decoder layer of ``preset`` in bfloat16."""
    return sum(_numel(s) for s in layer_shapes(PRESETS[preset]).values()) * 2


def layer_numel(preset: str) -> int:
    return sum(_numel(s) for s in layer_shapes(PRESETS[preset]).values())


def cache_root() -> Path:
    return Path(os.environ.get("nnUNet_LLM_SYNTHETIC_CACHE") or Path(tempfile.gettempdir()) / "nnunetv2_llm_synthetic")


def ensure_synthetic_checkpoint(preset: str, num_layers: int = 1, embeddings: bool = False,
                                shard_bytes: int = 2 * 1024 ** 3, root: str | os.PathLike | None = None) -> Path:
    """The folder for these settings under ``root`` (default: ``$nnUNet_LLM_SYNTHETIC_CACHE`` or the temp
    dir), written if missing or incomplete."""
    root = Path(root) if root is not None else cache_root()
    folder = root / f"{preset}-{num_layers}layers{'-emb' if embeddings else ''}-shard{shard_bytes // 2 ** 20}MiB"
    marker = folder / ".complete"
    if not marker.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        write_synthetic_checkpoint(folder, preset, num_layers, embeddings, shard_bytes)
        marker.write_text("ok\n")
    return folder


def resolve_synthetic(value: str | None) -> str | None:
    """``synthetic:PRESET`` -> the path of a one-layer synthetic folder (written if missing); else ``value``."""
    if not value or not str(value).startswith(SYNTHETIC_PREFIX):
        return value
    preset = str(value)[len(SYNTHETIC_PREFIX):]
    if preset not in PRESETS:
        from nnunetv2_llm.common.errors import LLMSettingError

        raise LLMSettingError(f"unknown synthetic LLM '{value}'; known: "
                              f"{', '.join(SYNTHETIC_PREFIX + p for p in PRESETS)}", "--llm-source")
    return str(ensure_synthetic_checkpoint(preset))
