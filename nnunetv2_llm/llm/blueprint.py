"""The classes that run one layer of a model family stand-alone, and instances of that layer.

The model is built on the meta device (accelerate's ``init_empty_weights``: no memory) to find its layer and
rotary-embedding classes; a layer with loaded weights is built empty and its tensors are put in place with
accelerate's ``set_module_tensor_to_device``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class LayerBlueprint:
    """The classes needed to run one layer of a model family stand-alone."""

    layer_cls: type
    rotary_cls: type | None
    layer_list_name: str  # e.g. 'layers' or 'layer', the ModuleList holding the stack
    meta_model: nn.Module  # the whole model on the meta device (no memory): used for GGUF name mapping

    def key_pattern(self, index: int) -> re.Pattern:
        """Matches a checkpoint key of layer ``index`` (``model.layers.3.mlp.up_proj.weight``); group 1 is the key
        relative to the layer (``mlp.up_proj.weight``)."""
        return re.compile(rf"^(?:.*\.)?{self.layer_list_name}\.{index}\.(.+)$")


def layer_blueprint(config: PretrainedConfig) -> LayerBlueprint:
    """Find the layer (and rotary embedding) classes by building the base model on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    try:
        with init_empty_weights(include_buffers=True):  # buffers too: the model is inspected, never run
            model = AutoModel.from_config(config)
        layer_list_name, stack = next(
            (name, m) for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers
        )
    except Exception as e:  # inconsistent config (e.g. heads not dividing the hidden size), no layer stack
        raise LLMSettingError(f"the {config.model_type} config (hidden size {getattr(config, 'hidden_size', '?')}) "
                              f"does not build a model: {one_line(e)}", ENV_SOURCE) from None
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    return LayerBlueprint(type(stack[0]), type(rotary) if rotary is not None else None,
                          layer_list_name.split(".")[-1], model)


def _construct(blueprint: LayerBlueprint, config: PretrainedConfig, index: int) -> nn.Module:
    kwargs = {"layer_idx": index} if "layer_idx" in inspect.signature(blueprint.layer_cls.__init__).parameters else {}
    return blueprint.layer_cls(config, **kwargs)


def instantiate_layer(blueprint: LayerBlueprint, config: PretrainedConfig, index: int,
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """A layer on the CPU with its class's own initialisation, its parameters created in ``dtype`` (a bfloat16 layer
    is never built in float32 first: that would double its memory)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            return _construct(blueprint, config, index)
    finally:
        torch.set_default_dtype(default)


def empty_layer(blueprint: LayerBlueprint, config: PretrainedConfig, index: int) -> nn.Module:
    """A layer whose parameters are on the meta device (shapes and names, no memory); buffers are real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return _construct(blueprint, config, index)


def layer_from_state_dict(blueprint: LayerBlueprint, config: PretrainedConfig, index: int,
                          state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A layer holding ``state_dict``'s tensors, floating ones in ``dtype`` (taken as they are, no copy, when they
    already are in it), each on its own device. ``state_dict``: keys relative to the layer, all of them."""
    from accelerate.utils import set_module_tensor_to_device

    layer = empty_layer(blueprint, config, index)
    expected = layer.state_dict().keys()
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise ValueError(f"the state dict does not match the layer: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    for name, tensor in state_dict.items():  # a wrong shape raises ValueError
        set_module_tensor_to_device(layer, name, tensor.device, value=tensor, dtype=dtype, clear_cache=False)
    return layer
