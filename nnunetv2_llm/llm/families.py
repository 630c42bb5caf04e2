"""Which transformers model families can lend one layer to the bottleneck: a rule derived from transformers itself.

A family is accepted when its config is a language model's (transformers has a causal- or masked-LM head for it),
it is neither an encoder-decoder nor a composite of sub-models (multimodal wrappers), its base model (``AutoModel``)
built on the meta device holds a stack of ``num_hidden_layers`` layers, and the chosen layer

- is dense: no mixture-of-experts block (experts, router);
- mixes tokens by attention, and only by attention: no state-space, recurrent, linear-attention or
  convolutional token mixer;
- takes nothing the full model computes besides the hidden states and the positions supplied here
  (``positions.py``): no ALiBi bias, relative-position tensors or per-layer side inputs;
- runs stand-alone, bidirectionally, on the meta device (``blueprint.check_layer``).

Each refusal is one line naming its reason. Everything else about the layer (its classes, its rotary embedding,
its initialisation) is transformers' own code for that family.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Class names of mixture-of-experts blocks in transformers (e.g. MixtralSparseMoeBlock, OlmoeExperts, JetMoeMoA).
_MOE = re.compile(r"Experts|Router|Gating|SparseMoe|MoE$|Moe$|MoA$|MoeBlock$|MoELayer$")
# Token mixers that are not attention (MambaMixer, Lfm2ShortConv, RecurrentGemmaRglru, KimiLinearDeltaAttention...).
_RECURRENT = re.compile(r"Mamba|Mixer|SSM|Recurrent|Rglru|Rwkv|LSTM|ShortConv|Delta|LinearAttention|Conv")
_LINEAR_CLASSES = ("Conv1D",)  # transformers' GPT-2 style linear layer, not a convolution
# Layer arguments with nothing to supply for a stand-alone bidirectional layer (cache, outputs, cross-attention).
_OPTIONAL_ARGUMENTS = {"cache", "past_key_values", "past_key_value", "layer_past", "use_cache",
                       "output_attentions", "cache_position", "encoder_hidden_states", "encoder_attention_mask",
                       "head_mask", "layer_head_mask", "output_hidden_states", "return_dict"}
SUPPLIED_ARGUMENTS = {"attention_mask", "position_ids", "position_embeddings"}  # None; positions.py
_BIAS_ARGUMENTS = {"alibi": "ALiBi attention bias", "position_bias": "a position bias (ALiBi or relative)",
                   "rel_embeddings": "relative position embeddings", "relative_pos": "relative positions",
                   "sinusoidal_pos": "sinusoidal rotary positions"}


def config_refusal(config: PretrainedConfig) -> str | None:
    """Why a family cannot lend a layer, judged from its config alone (None: go on building it).

    Args:
        config: the model's config (its ``model_type`` and structure).

    Returns:
        A one-line reason, or None.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    model_type = config.model_type
    if model_type not in CONFIG_MAPPING_NAMES:
        return "not a transformers model type (custom model code is never run)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model (its decoder layers attend to an encoder's output)"
    parts = [name for name, cls in (getattr(config, "sub_configs", None) or {}).items() if _is_model(config, name, cls)]
    if parts:
        return f"a composite of sub-models ({', '.join(parts)}, e.g. a multimodal wrapper): use its text model"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "not a language model (transformers has no causal or masked LM head for it)"
    if model_type not in MODEL_MAPPING_NAMES:
        return "transformers has no base model (AutoModel) for it"
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        return "its config has no num_hidden_layers (no stack of layers)"
    return None


def _converted_on_load(model_type: str) -> bool:
    """Whether transformers maps this family's checkpoint keys onto its modules other than by a prefix (which the
    readers' key pattern ignores anyway)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return any(type(t).__name__ != "PrefixChange" for t in get_checkpoint_conversion_mapping(model_type) or ())


def layer_refusal(config: PretrainedConfig, layer: nn.Module) -> str | None:
    """Why one layer (built on the meta device) cannot run stand-alone here (None: it can).

    Args:
        config: the model's config (ALiBi switches).
        layer: one layer of the model's stack, any device.

    Returns:
        A one-line reason, or None.
    """
    names = [type(m).__name__ for m in layer.modules()]
    moe = next((n for n in names if _MOE.search(n)), None)
    if moe:
        return f"a mixture-of-experts layer ({moe})"
    mixer = next((n for n in names if _RECURRENT.search(n) and n not in _LINEAR_CLASSES), None)
    if mixer:
        return f"a state-space, recurrent or convolutional token mixer ({mixer}), not attention"
    if not any("Attention" in n for n in names):
        return f"a layer without attention ({names[0]}): it would not mix tokens"
    if _converted_on_load(config.model_type):
        return ("transformers renames or splits its checkpoint tensors on load (a checkpoint conversion mapping), "
                "which the single-layer readers do not apply")
    return argument_refusal(config, type(layer))


def argument_refusal(config: PretrainedConfig, layer_cls: type) -> str | None:
    """Why the layer's ``forward`` arguments cannot be supplied stand-alone (None: they can)."""
    for name, parameter in extra_arguments(layer_cls).items():
        if name == "alibi" and _alibi_off(config):
            continue  # Falcon with rotary positions: the model passes alibi=None
        if name in _BIAS_ARGUMENTS:
            return f"its layer takes {_BIAS_ARGUMENTS[name]} ('{name}') computed by the full model"
        if name not in _OPTIONAL_ARGUMENTS or parameter.default is inspect.Parameter.empty:
            return f"its layer takes '{name}', which the full model computes outside the layer"
    return None


def extra_arguments(layer_cls: type) -> dict[str, inspect.Parameter]:
    """``forward``'s named arguments after the hidden states, without the ones ``positions.py`` supplies."""
    parameters = list(inspect.signature(layer_cls.forward).parameters.values())[2:]  # self, hidden states
    return {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in SUPPLIED_ARGUMENTS}


def _is_model(config: PretrainedConfig, name: str, cls: type) -> bool:
    """Whether sub-config ``name`` describes a whole sub-model (a text or vision tower), not a part's settings."""
    sub = getattr(config, name, None)
    return hasattr(sub, "num_hidden_layers") if sub is not None else cls.__name__ == "AutoConfig"


def _alibi_off(config: PretrainedConfig) -> bool:
    return getattr(config, "alibi", True) is False


@dataclass(frozen=True)
class FamilyVerdict:
    """One model type as ``nnunetv2_llm info --list-families`` shows it: accepted with its position scheme, or
    refused with a reason (judged on transformers' default config of that type)."""

    model_type: str
    positions: str = ""
    refusal: str = ""

    @property
    def accepted(self) -> bool:
        return not self.refusal


def language_model_types() -> list[str]:
    """Every model type transformers has a causal- or masked-LM head for, sorted."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))
