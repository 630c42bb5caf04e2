"""Hugging Face safetensors folders: one layer's tensors through lazy ``safe_open`` reads of the shards that hold
them (found via ``model.safetensors.index.json``, or the files' headers when the model is not sharded)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nnunetv2_llm.llm.blueprint import LayerBlueprint


@contextlib.contextmanager
def _safetensors_errors(folder: Path, index: int) -> Iterator[None]:
    """Any failure reading a safetensors folder becomes an LLMSettingError naming it."""
    try:
        yield
    except LLMSettingError:
        raise
    except Exception as e:  # truncated header, bad index, missing shard, ...
        raise LLMSettingError(f"could not read layer {index} from '{folder}' (corrupt or incomplete safetensors?): "
                              f"{one_line(e)}", ENV_SOURCE) from None


def _layer_keys(folder: Path, index: int, blueprint: LayerBlueprint) -> dict[Path, list[tuple[str, str]]]:
    """shard path -> [(key in the file, key relative to the layer)] for layer ``index``, in the files' order."""
    from safetensors import safe_open

    pattern = blueprint.key_pattern(index)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        weight_map = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                weight_map.update({k: shard.name for k in f.keys()})
    wanted: dict[Path, list[tuple[str, str]]] = {}
    for key, shard in weight_map.items():
        match = pattern.match(key)
        if match:
            # a bare file name (checked lexically: Hugging Face cache snapshots hold symlinks into ../../blobs)
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise LLMSettingError(f"'{index_file}' points outside the model folder ('{shard}')", ENV_SOURCE)
            wanted.setdefault(folder / shard, []).append((key, match.group(1)))
    return wanted


def read_safetensors_layer(folder: Path, config: PretrainedConfig, index: int,
                           blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """Layer ``index`` of a safetensors folder in its stored dtypes, keys relative to the layer."""
    from safetensors import safe_open

    tensors = {}
    with _safetensors_errors(folder, index):
        for shard_path, keys in _layer_keys(folder, index, blueprint).items():
            with safe_open(shard_path, framework="pt") as f:
                for key, local in keys:
                    tensors[local] = f.get_tensor(key)
    return tensors


def safetensors_layer_headers(folder: Path, index: int, blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """Layer ``index`` as meta tensors of the stored shapes and dtypes, from the shards' headers (no data read)."""
    from safetensors import safe_open

    tensors = {}
    with _safetensors_errors(folder, index):
        for shard, keys in _layer_keys(folder, index, blueprint).items():
            with safe_open(shard, framework="pt") as f:
                for key, local in keys:
                    stored = f.get_slice(key)
                    shape = stored.get_shape()
                    # an empty slice gives the header's dtype, no data read (a scalar: its one element)
                    dtype = (stored[0:0] if shape else stored[()]).dtype
                    tensors[local] = torch.empty(shape, dtype=dtype, device="meta")
    return tensors
