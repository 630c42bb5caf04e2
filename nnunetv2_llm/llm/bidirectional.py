"""Bidirectional attention for any family's layer: transformers' attention interface routed to one SDPA call that
never applies a causal mask (and no sliding window), whatever the layer's class asks for."""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_NAME = "nnunetv2_llm_bidirectional_sdpa"
# What the layer's own implementation would choose between; a flash or flex choice is left alone.
_ROUTED_IMPLEMENTATIONS = (None, "eager", "sdpa")
# Attention arguments that change the result and are not implemented here (attention sinks, position biases,
# sparse attention); the others are bookkeeping (caches, other backends), and ``sliding_window`` is dropped on
# purpose: every token sees every token.
_UNSUPPORTED_ARGUMENTS = ("sinks", "s_aux", "position_bias", "indices", "block_indices", "topk_indices")


def bidirectional_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, dropout: float = 0.0,
                       scaling: float | None = None, softcap: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: attention over all tokens (never causal), grouped-query aware.

    Args:
        module: the attention module (``num_key_value_groups`` is read from it).
        query: (B, H, N, d); key, value: (B, H_kv, N, d).
        attention_mask: an additive or boolean mask, or None (the frozen layer passes none).
        dropout: attention dropout probability (0 in eval mode).
        scaling: the logit scale (default 1/sqrt(d)).
        softcap: Gemma-2's logit soft-capping, ``tanh(logits / softcap) * softcap`` (explicit attention: SDPA has none).

    Returns:
        (B, N, H, d) and None, as transformers' ``sdpa_attention_forward``.

    Raises:
        ValueError: an attention argument this function cannot honour (attention sinks, sparse indices...).
    """
    unknown = [k for k in _UNSUPPORTED_ARGUMENTS if kwargs.get(k) is not None]
    if unknown:
        raise ValueError(f"bidirectional attention does not implement the attention argument(s) {unknown}")
    groups = getattr(module, "num_key_value_groups", 1) or 1
    if softcap is not None:
        return _softcapped_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask,
                                     scaling, softcap), None
    extra = {}
    if groups > 1:
        if query.is_cuda and query.dtype == torch.float32:  # no grouped-query fp32 kernel on CUDA: avoid the math path
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        else:
            extra["enable_gqa"] = True
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, **extra)
    return out.transpose(1, 2).contiguous(), None


def _softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None, softcap: float) -> torch.Tensor:
    """query, key, value (B, H, N, d) -> (B, N, H, d); logits soft-capped as Gemma-2's eager attention."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.tanh(query @ key.transpose(-1, -2) * scale / softcap) * softcap
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous()


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, N, d) -> (B, H_kv * groups, N, d), each key/value head repeated for its query heads."""
    if groups == 1:
        return states
    b, h, n, d = states.shape
    return states[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def make_bidirectional(layer: nn.Module, implementation: str = ATTENTION_NAME) -> None:
    """Every attention module of ``layer`` attends to all tokens: ``is_causal`` False, built-in causal masks opened,
    and attention through the interface (eager or SDPA) routed to ``bidirectional_sdpa``. Mutates the config
    objects the modules hold.

    Args:
        layer: the layer, any device.
        implementation: ``ATTENTION_NAME``, or 'sdpa' for a layer whose attention calls SDPA itself instead of
            transformers' interface (Falcon): ``is_causal`` False then makes that call non-causal.
    """
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, bidirectional_sdpa)
    for module in layer.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
        _open_causal_buffers(module)
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) in _ROUTED_IMPLEMENTATIONS:
            config._attn_implementation = implementation


def _open_causal_buffers(module: nn.Module) -> None:
    """An attention module's own (N, N) boolean mask buffer (GPT-Neo's causal and local ``bias``), made all-visible.
    Only non-persistent buffers: they are rebuilt by the class, never part of the checkpoint or its checksum."""
    if "Attention" not in type(module).__name__:
        return
    for name, buffer in list(module.named_buffers(recurse=False)):
        if (buffer.dtype == torch.bool and buffer.dim() >= 2 and buffer.shape[-1] == buffer.shape[-2]
                and name in module._non_persistent_buffers_set):
            module.register_buffer(name, torch.ones_like(buffer), persistent=False)
