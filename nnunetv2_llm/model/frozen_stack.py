"""Consecutive frozen LLM layers run one after the other (``nnUNet_LLM_LAYER=20:24``), and the reading of their
tensors.

One layer is a ``FrozenLLMLayer`` whose ``layer`` holds the transformers layer; a stack is a ``FrozenLLMStack`` whose
``layer`` holds one ``FrozenLLMLayer`` per source layer. Both keep the frozen tensors under the mixer's ``layer.``, so
the network's ``FROZEN_PREFIX`` and the checksum over them (``spec.state_dict_sha256``) cover one layer and a stack
alike. A stack's state-dict keys are ``{position}.layer.{key}`` (position 0 is the first layer of the range).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.llm.layer import read_layer_state_dict
from nnunetv2_llm.model.frozen_layer import FrozenLLMLayer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nnunetv2_llm.llm.blueprint import LayerBlueprint

_SEED_STRIDE = 7919  # a stack's random layers get distinct seeds; position 0 keeps the spec's (a single layer's) seed


class FrozenLLMStack(nn.Module):
    """Frozen layers applied in order: tokens (B, N, D) -> tokens (B, N, D) in the layers' dtype."""

    def __init__(self, layers: list[FrozenLLMLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)  # named as FrozenLLMLayer's: the frozen tensors sit under the same prefix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) -> (B, N, D), through each layer with its own positions and bidirectional attention."""
        for layer in self.layer:
            tokens = layer(tokens)
        return tokens


def stack_key(position: int, key: str) -> str:
    """A stack's state-dict key of ``key`` (relative to a transformers layer) in the layer at ``position``."""
    return f"{position}.layer.{key}"


def read_stack_state_dict(source: Path, config: PretrainedConfig, layers: range,
                          blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """The tensors of ``layers``, keyed as the mixer holds them: relative to the layer for one layer, ``stack_key``
    for several (each layer read alone, as ``read_layer_state_dict`` does)."""
    if len(layers) == 1:
        return read_layer_state_dict(source, config, layers[0], blueprint)
    state = {}
    for position, index in enumerate(layers):
        for key, tensor in read_layer_state_dict(source, config, index, blueprint).items():
            state[stack_key(position, key)] = tensor
    return state


def _layer_state(state: dict[str, torch.Tensor], position: int) -> dict[str, torch.Tensor]:
    prefix = stack_key(position, "")
    return {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def frozen_mixer(blueprint: LayerBlueprint, config: PretrainedConfig, layers: range, dtype: torch.dtype,
                 state: dict[str, torch.Tensor] | None, seed: int) -> FrozenLLMLayer | FrozenLLMStack:
    """The frozen layer (or stack) holding ``state`` (keys as ``read_stack_state_dict`` gives them), or, when
    ``state`` is None, randomly initialised with ``seed`` (the random control, or a placeholder a checkpoint fills)."""
    def one(position: int, index: int) -> FrozenLLMLayer:
        if state is None:
            return FrozenLLMLayer.random(blueprint, config, index, seed + _SEED_STRIDE * position, dtype)
        layer_state = state if len(layers) == 1 else _layer_state(state, position)
        return FrozenLLMLayer.from_state_dict(blueprint, config, index, layer_state, dtype)

    built = [one(position, index) for position, index in enumerate(layers)]
    return built[0] if len(built) == 1 else FrozenLLMStack(built)
