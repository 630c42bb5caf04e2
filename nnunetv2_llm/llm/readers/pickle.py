"""Pickled weights (opt-in, ``nnUNet_LLM_ALLOW_PICKLE=1``): ``pytorch_model*.bin`` / ``*.pth`` shards read with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only (no code is run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line, pickled_files

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nnunetv2_llm.llm.blueprint import LayerBlueprint


def read_pickle_layer(folder: Path, config: PretrainedConfig, index: int,
                      blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """Layer ``index`` from the folder's pickled shards, keys relative to the layer; the tensors are copies, so no
    shard stays memory-mapped."""
    pattern = blueprint.key_pattern(index)
    tensors = {}
    try:
        for shard in pickled_files(folder):
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                continue
            for key, value in state.items():
                match = pattern.match(str(key))
                if match and isinstance(value, torch.Tensor):
                    tensors[match.group(1)] = value.clone()
    except Exception as e:  # truncated zip, a pickle asking for globals weights_only refuses, ...
        raise LLMSettingError(f"could not read layer {index} from the pickled weights in '{folder}' "
                              f"(torch.load with weights_only=True): {one_line(e)}", ENV_SOURCE) from None
    return tensors
