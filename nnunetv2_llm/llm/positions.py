"""The positions a layer was trained with, supplied the way its full model supplies them.

- Rotary families: the model's own rotary-embedding class (found in the base model, outside the layer stack) gives
  ``position_embeddings = (cos, sin)`` for positions 0..N-1, exactly as the model's ``forward``; partial rotary
  (Phi, StableLM, GPT-NeoX: ``partial_rotary_factor``) is in that class's tables, and a rotary class whose
  ``forward`` takes ``layer_type`` (Gemma-3's local and global bases, ModernBERT) is called with the layer's own
  ``config.layer_types[index]``, as the model calls it for that layer.
- Layers that take ``position_ids`` get 0..N-1 (rotary computed inside the layer, or unused).
- Learned absolute positions (GPT-2, BioGPT, OPT, BERT, RoBERTa...) and token-type embeddings live in the model's
  embedding layer, which is not used: these layers take no positions.
- Falcon without ALiBi gets ``alibi=None``, as its model passes it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.llm.bidirectional import ATTENTION_NAME
from nnunetv2_llm.llm.families import extra_arguments

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_ABSOLUTE = re.compile(r"pos|wpe", re.IGNORECASE)  # wpe, position_embeddings, embed_positions, positions_embed


@dataclass(frozen=True)
class PositionInputs:
    """What one layer takes besides its hidden states, and how to compute it for N tokens."""

    scheme: str  # readable: 'rotary', 'rotary on 25% of each head', 'none in the layer (...)'
    rotary_cls: type | None = None  # builds (cos, sin) tables: ``rotary_cls(config=config)(x, position_ids)``
    layer_type: str | None = None  # passed to the rotary module when its forward takes it
    position_ids: bool = False  # the layer's forward takes ``position_ids``
    fixed: dict = field(default_factory=dict)  # constant arguments, e.g. {'alibi': None}
    attention: str = ATTENTION_NAME  # the attention implementation: ``bidirectional.make_bidirectional``

    def rotary(self, config: PretrainedConfig) -> nn.Module | None:
        """A rotary module for ``config`` (on the default device), or None when the layer takes no tables."""
        return self.rotary_cls(config=config) if self.rotary_cls is not None else None


def rotary_modules(model: nn.Module, stack_name: str) -> list[nn.Module]:
    """The rotary-embedding modules of a base model outside its layer stack, in module order."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and not name.startswith(stack_name + "."):
            found.append(module)
    return found


def position_inputs(config: PretrainedConfig, model: nn.Module, stack_name: str, layer: nn.Module,
                    index: int) -> PositionInputs | str:
    """The positions layer ``index`` takes, or a one-line reason why they cannot be supplied.

    Args:
        config: the model's config.
        model: the base model on the meta device.
        stack_name: the layer stack's module path in ``model`` (e.g. 'layers', 'encoder.layer').
        layer: layer ``index`` of the stack (meta device).
        index: its index (selects its attention type).
    """
    parameters = inspect.signature(type(layer).forward).parameters
    fixed = {"alibi": None} if "alibi" in extra_arguments(type(layer)) else {}
    takes_ids = "position_ids" in parameters
    if "position_embeddings" not in parameters:
        inner = any(type(m).__name__.endswith("RotaryEmbedding") for m in layer.modules())
        scheme = "rotary inside the layer (from position ids)" if inner else _absolute_scheme(model, stack_name)
        return PositionInputs(scheme, position_ids=takes_ids, fixed=fixed)
    rotaries = rotary_modules(model, stack_name)
    if len(rotaries) != 1:
        return (f"its model computes positions with {len(rotaries)} rotary embedding modules "
                f"({', '.join(sorted({type(r).__name__ for r in rotaries})) or 'none found'})")
    rotary = rotaries[0]
    layer_type = None
    if "layer_type" in inspect.signature(type(rotary).forward).parameters:
        layer_type = config.layer_types[index]
    scheme = _rotary_scheme(layer, rotary, layer_type)
    return PositionInputs(scheme, type(rotary), layer_type, takes_ids, fixed)


def _rotary_scheme(layer: nn.Module, rotary: nn.Module, layer_type: str | None) -> str:
    """'rotary', with the share of each head it turns and the attention type whose base it uses."""
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq" if layer_type else "inv_freq", None)
    head_dim = next((getattr(m, name) for m in layer.modules() for name in ("head_dim", "head_size")  # GPT-NeoX
                     if isinstance(getattr(m, name, None), int)), 0)
    turned = 2 * inv_freq.shape[-1] if isinstance(inv_freq, torch.Tensor) else getattr(rotary, "pos_embd_dim", 0)
    text = "rotary"
    if 0 < turned < head_dim:  # GPT-J keeps a (positions, rotary dim) table, pos_embd_dim wide, instead of inv_freq
        text += f" on {turned} of {head_dim} head dimensions (partial)"
    if layer_type:
        text += f", base of its attention type '{layer_type}'"
    return text


def _absolute_scheme(model: nn.Module, stack_name: str) -> str:
    """Names the model's absolute position table (a module, or a buffer as CTRL's sinusoids) outside the stack."""
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_buffers()]
    absolute = [name for name in names
                if name and not name.startswith(stack_name) and _ABSOLUTE.search(name.split(".")[-1])]
    if absolute:
        return f"none in the layer (absolute positions live in the embedding layer: {absolute[0]})"
    return "none"
