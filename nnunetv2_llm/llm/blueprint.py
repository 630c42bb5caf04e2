"""The classes that run one layer of a model family stand-alone, and instances of that layer.

The base model is built on the meta device (accelerate's ``init_empty_weights``: no memory) from the family's own
modeling code; its stack of ``num_hidden_layers`` layers gives each layer's class (hybrid models mix classes), and
``families`` decides whether the chosen layer can run here. A layer with loaded weights is built empty and its
tensors are put in place with accelerate's ``set_module_tensor_to_device``.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.bidirectional import make_bidirectional
from nnunetv2_llm.llm.families import config_refusal, layer_refusal
from nnunetv2_llm.llm.positions import PositionInputs, position_inputs
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_PROBE_TOKENS = 3
_INDEX_ARGUMENTS = ("layer_idx", "layer_id", "layer_number")  # how layer classes name their index (GPT-Neo: layer_id)


@dataclass
class LayerBlueprint:
    """The classes needed to run one layer of a model family stand-alone."""

    stack_path: str  # the ModuleList holding the layers, e.g. 'layers' or 'encoder.layer'
    meta_model: nn.Module  # the whole model on the meta device (no memory): layer classes, GGUF name mapping
    _checked: dict = field(default_factory=dict, repr=False)  # layer index -> PositionInputs, once checked

    @property
    def layer_list_name(self) -> str:
        """The stack's own name ('layers', 'layer', 'h'), as checkpoint keys spell it."""
        return self.stack_path.split(".")[-1]

    @property
    def stack(self) -> nn.ModuleList:
        return self.meta_model.get_submodule(self.stack_path)

    def layer_cls(self, index: int) -> type:
        """The class of layer ``index`` (hybrid models hold several)."""
        return type(self.stack[index])

    def key_pattern(self, index: int) -> re.Pattern:
        """Matches a checkpoint key of layer ``index`` (``model.layers.3.mlp.up_proj.weight``); group 1 is the key
        relative to the layer (``mlp.up_proj.weight``)."""
        return re.compile(rf"^(?:.*\.)?{self.layer_list_name}\.{index}\.(.+)$")


class FamilyRefused(LLMSettingError):
    """A family, or one layer of it, that cannot run here; ``reason`` says why in one line."""

    def __init__(self, config: PretrainedConfig, reason: str):
        self.reason = reason
        super().__init__(f"model type '{config.model_type}' is not supported: {reason}", ENV_SOURCE)


def layer_blueprint(config: PretrainedConfig) -> LayerBlueprint:
    """Find the layer stack by building the base model on the meta device.

    Raises:
        LLMSettingError: the family is refused (``families.config_refusal``) or its config builds no layer stack.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModel

    reason = config_refusal(config)
    if reason:
        raise FamilyRefused(config, reason)
    try:
        with init_empty_weights(include_buffers=True):  # buffers too: the model is inspected, never run
            model = AutoModel.from_config(copy.deepcopy(config))  # building may set attributes on the config
    except Exception as e:  # inconsistent config (e.g. heads not dividing the hidden size)
        raise LLMSettingError(f"the {config.model_type} config (hidden size {getattr(config, 'hidden_size', '?')}) "
                              f"does not build a model: {one_line(e)}", ENV_SOURCE) from None
    stack_path = next((name for name, m in model.named_modules()
                       if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers), None)
    if stack_path is None:
        raise FamilyRefused(config, f"its base model {type(model).__name__} holds no stack of "
                                    f"{config.num_hidden_layers} layers")
    return LayerBlueprint(stack_path, model)


def check_layer(blueprint: LayerBlueprint, config: PretrainedConfig, index: int) -> PositionInputs:
    """The positions layer ``index`` takes, after checking that it can run here: a dense attention layer
    (``families.layer_refusal``) whose inputs can be supplied, that runs stand-alone with bidirectional attention
    on the meta device and returns its input's shape. Checked once per blueprint and index (that the attention
    really is bidirectional needs values: ``FrozenLLMLayer.checked_bidirectional``).

    Raises:
        LLMSettingError: one line naming the reason.
    """
    if index in blueprint._checked:
        return blueprint._checked[index]
    layer = blueprint.stack[index]
    try:
        reason = layer_refusal(config, layer)
        positions = position_inputs(config, blueprint.meta_model, blueprint.stack_path, layer, index)
    except Exception as e:  # a layer or config shaped unlike any family above (e.g. per-layer heterogeneous)
        reason, positions = f"its layer could not be inspected: {one_line(e)}", None
    if reason is None and isinstance(positions, str):
        reason = positions
    if reason is None:
        reason = _probe(blueprint, config, index, positions)
        if reason is not None and _probe(blueprint, config, index, replace(positions, attention="sdpa")) is None:
            reason, positions = None, replace(positions, attention="sdpa")  # attention that calls SDPA itself
    if reason is not None:
        raise FamilyRefused(config, f"layer {index} is {reason}" if reason.startswith("a ") else reason)
    blueprint._checked[index] = positions
    return positions


def _probe(blueprint: LayerBlueprint, config: PretrainedConfig, index: int, positions: PositionInputs) -> str | None:
    """Run the layer on a few meta tokens as ``FrozenLLMLayer`` will; a reason when it fails."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)  # make_bidirectional changes the attention implementation it names
    try:
        with init_empty_weights(include_buffers=True):
            layer = _construct(blueprint, config, index)
            rotary = positions.rotary(config)
        make_bidirectional(layer, positions.attention)
        hidden = torch.zeros(1, _PROBE_TOKENS, config.hidden_size, device="meta")
        out = layer(hidden, **layer_arguments(positions, rotary, hidden))
        out = out[0] if isinstance(out, tuple) else out
        if tuple(out.shape) != tuple(hidden.shape):
            return f"its layer returns shape {tuple(out.shape)} for tokens of shape {tuple(hidden.shape)}"
    except Exception as e:  # whatever stops the layer from running stand-alone
        return f"its layer does not run stand-alone: {one_line(e)}"
    return None


def layer_arguments(positions: PositionInputs, rotary: nn.Module | None, hidden: torch.Tensor) -> dict:
    """The keyword arguments of one layer call for ``hidden`` (B, N, D): no mask, positions 0..N-1 (1, N) and the
    rotary tables (cos, sin), each (1, N, rotary dim), that broadcast over the batch."""
    kwargs = {"attention_mask": None, **positions.fixed}
    ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    if positions.position_ids:
        kwargs["position_ids"] = ids
    if rotary is not None:
        extra = {"layer_type": positions.layer_type} if positions.layer_type else {}
        kwargs["position_embeddings"] = tuple(rotary(hidden[:1].detach(), ids, **extra))
    return kwargs


def _construct(blueprint: LayerBlueprint, config: PretrainedConfig, index: int) -> nn.Module:
    layer_cls = blueprint.layer_cls(index)
    if getattr(config, "_attn_implementation", None) is None:  # some classes pick their attention class by it
        config = copy.copy(config)
        config._attn_implementation = "eager"
    parameters = inspect.signature(layer_cls.__init__).parameters
    return layer_cls(config, **{name: index for name in _INDEX_ARGUMENTS if name in parameters})


def instantiate_layer(blueprint: LayerBlueprint, config: PretrainedConfig, index: int,
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """A layer on the CPU with its class's own initialisation, its parameters created in ``dtype`` (a bfloat16 layer
    is never built in float32 first: that would double its memory)."""
    check_layer(blueprint, config, index)
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

    check_layer(blueprint, config, index)
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
