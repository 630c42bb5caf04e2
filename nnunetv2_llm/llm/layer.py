"""One layer's tensors read from a source and checked, and the dtype the layer is stored in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.blueprint import LayerBlueprint, empty_layer
from nnunetv2_llm.llm.readers.gguf import read_gguf_layer
from nnunetv2_llm.llm.readers.pickle import read_pickle_layer
from nnunetv2_llm.llm.readers.safetensors import read_safetensors_layer, safetensors_layer_headers
from nnunetv2_llm.llm.source import ENV_SOURCE, source_format

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """NaN/Inf check in chunks: a whole-tensor ``isfinite`` would allocate a mask as large as the layer."""
    return all(bool(torch.isfinite(c).all()) for c in tensor.reshape(-1).split(chunk))


def read_layer_state_dict(source: Path, config: PretrainedConfig, index: int,
                          blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """The state dict of layer ``index`` only, keys relative to the layer (e.g. ``self_attn.q_proj.weight``).

    Refuses (LLMSettingError) a layer whose tensors do not match the layer class or hold NaN/Inf: a corrupt
    file must not reach training, where it would only show up as a NaN loss."""
    expected = set(empty_layer(blueprint, config, index).state_dict().keys())
    read = {"gguf": read_gguf_layer, "pickle": read_pickle_layer,
            "safetensors": read_safetensors_layer}[source_format(source)]
    tensors = read(source, config, index, blueprint)
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise LLMSettingError(
            f"layer {index} of '{source}' does not match a {config.model_type} layer: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}",
            ENV_SOURCE,
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise LLMSettingError(
                f"layer {index} of '{source}' holds NaN/Inf values in '{key}': the weights file is corrupt", ENV_SOURCE)
    return tensors


def storage_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The one rule for a layer's storage dtype: the dtype of its largest tensor (most elements: a linear weight),
    so that norms kept in float32 beside bfloat16 linears do not upcast the layer, whatever the key order (ties go to
    the first key in sorted order). ``tensors``: a layer's state dict, any shapes; meta tensors (shape and dtype
    only, no data) work too."""
    return max(sorted(tensors.items()), key=lambda item: item[1].numel())[1].dtype


def layer_storage_dtype(source: Path, config: PretrainedConfig, index: int, blueprint: LayerBlueprint) -> torch.dtype:
    """``storage_dtype`` of layer ``index`` as ``read_layer_state_dict`` returns it, without reading its weights where
    the format allows: GGUF layers are de-quantised to float32, safetensors headers give each tensor's shape and dtype
    (in every shard holding the layer). For the controls (no-LLM, random layer), which need the dtype but not the
    weights."""
    fmt = source_format(source)
    if fmt == "gguf":
        return torch.float32
    if fmt == "pickle":
        tensors = read_pickle_layer(source, config, index, blueprint)
    else:
        tensors = safetensors_layer_headers(source, index, blueprint)
    if not tensors:
        raise LLMSettingError(f"'{source}' holds no tensors of layer {index}", ENV_SOURCE)
    return storage_dtype(tensors)
