"""One frozen LLM transformer layer, run stand-alone on image tokens.

Choices (documented in the README):
- Attention is bidirectional: every attention module's ``is_causal`` is set to False and no mask is passed,
  so SDPA, eager and flash backends all attend to every token (transformers' decoder layers are causal
  by default and SDPA silently applies that when no mask is given). Attention goes through
  ``bidirectional_sdpa``, which passes ``is_causal=False`` explicitly and, for float32 on CUDA (no grouped-query
  SDPA kernel exists there), repeats the key/value heads so that the memory-efficient kernel runs instead of
  the unfused math fallback.
- Positions: decoder families get rotary embeddings over the raster order of the bottleneck voxels
  (the position scheme the layer was pre-trained with); BERT layers take no positions (BERT's absolute
  position embeddings live in its embedding layer, which is not used). The rotary tables (cos, sin) depend
  only on the token count, device and dtype, so they are computed once per combination and reused.
- Numerics: the layer runs with autocast disabled in its own dtype (float32 for GGUF and float32 sources,
  bfloat16 for bfloat16 and float16 sources, unless the trainer asks for bfloat16: ``nnUNetTrainerLLM_bf16``),
  so nnU-Net's fp16 autocast on CUDA cannot overflow it.
- Linears are ``nn.Linear``; ``nnUNet_LLM_ONEDNN=1`` opts in to ``onednn_linear`` on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.llm.blueprint import LayerBlueprint, instantiate_layer, layer_from_state_dict
from nnunetv2_llm.model.onednn_linear import onednn_requested, use_onednn_linears

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ATTENTION_NAME = "nnunetv2_llm_bidirectional_sdpa"
_ROTARY_CACHE_SIZE = 8


def bidirectional_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: SDPA over all tokens (never causal), grouped-query aware.

    query (B, H, N, d), key/value (B, H_kv, N, d) -> (B, N, H, d), as transformers' ``sdpa_attention_forward``."""
    groups = getattr(module, "num_key_value_groups", 1) or 1
    extra = {}
    if groups > 1:
        if query.is_cuda and query.dtype == torch.float32:
            key = _repeat_kv(key, groups)
            value = _repeat_kv(value, groups)
        else:
            extra["enable_gqa"] = True
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, **extra)
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, N, d) -> (B, H_kv * groups, N, d), each key/value head repeated for its query heads."""
    b, h, n, d = states.shape
    return states[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _use_bidirectional_sdpa(layer: nn.Module) -> None:
    """Route the layer's attention through ``bidirectional_sdpa`` where it would use transformers' SDPA."""
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, bidirectional_sdpa)
    for module in layer.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = ATTENTION_NAME


def weights_dtype(source_dtype: torch.dtype) -> torch.dtype:
    """Storage and compute dtype for the frozen layer: float16 becomes bfloat16 (same bytes, fp32 range)."""
    return torch.bfloat16 if source_dtype in (torch.float16, torch.bfloat16) else torch.float32


class FrozenLLMLayer(nn.Module):
    """A frozen pre-trained (or frozen random) LLM layer: tokens (B, N, D) -> tokens (B, N, D)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.compute_dtype = next(layer.parameters()).dtype
        for module in self.layer.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        _use_bidirectional_sdpa(self.layer)
        if onednn_requested():
            use_onednn_linears(self.layer)
        self.layer.requires_grad_(False)
        self.layer.eval()
        self._rotary_cache: dict = {}  # not a buffer: not in the state dict, rebuilt on any device

    @classmethod
    def from_state_dict(cls, blueprint: LayerBlueprint, config: PretrainedConfig, index: int,
                        state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> "FrozenLLMLayer":
        """The layer holding ``state_dict``'s tensors (keys relative to the layer) in ``dtype``, the spec's (no
        second copy where they already are in it)."""
        return cls(layer_from_state_dict(blueprint, config, index, state_dict, dtype), _rotary(blueprint, config))

    @classmethod
    def random(cls, blueprint: LayerBlueprint, config: PretrainedConfig, index: int, seed: int,
               dtype: torch.dtype = torch.float32) -> "FrozenLLMLayer":
        """The same architecture, randomly initialised as transformers initialises LLMs
        (linear weights ~ N(0, initializer_range), biases 0, norms 1), with a fixed seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = instantiate_layer(blueprint, config, index, dtype)
            std = getattr(config, "initializer_range", 0.02)
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        return cls(layer.to(dtype), _rotary(blueprint, config))

    def train(self, mode: bool = True) -> "FrozenLLMLayer":
        """The frozen layer always runs in eval mode (no dropout, e.g. BERT's 0.1): the same function in
        training and inference. Trainable LoRA adapters are built without dropout."""
        super().train(mode)
        self.layer.eval()
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) in any dtype -> (B, N, D) in the layer's dtype, bidirectional attention."""
        h = tokens.to(self.compute_dtype)
        kwargs = {}
        if self.rotary is not None:
            positions, cos_sin = self._rotary_tables(h)
            kwargs = {"position_ids": positions.expand(h.shape[0], -1), "position_embeddings": cos_sin}
        out = self.layer(h, attention_mask=None, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _rotary_tables(self, h: torch.Tensor):
        """Positions 0..N-1 (1, N) and the rotary (cos, sin), each (1, N, head_dim): they broadcast over the batch
        and depend only on N, device and dtype, so they are computed once and reused (under torch.compile they are
        computed in the graph, where the compiler folds them)."""
        n = h.shape[1]
        probe = h[:1].detach()  # the rotary module reads only dtype and device; keep it out of autograd and hooks
        if torch.compiler.is_compiling():
            positions = torch.arange(n, device=h.device).unsqueeze(0)
            return positions, self.rotary(probe, positions)
        key = (n, h.device, h.dtype, torch.is_inference_mode_enabled())  # inference tensors can't enter autograd
        cached = self._rotary_cache.get(key)
        if cached is None:
            with torch.no_grad():
                positions = torch.arange(n, device=h.device).unsqueeze(0)
                cached = (positions, tuple(self.rotary(probe, positions)))
            if len(self._rotary_cache) >= _ROTARY_CACHE_SIZE:
                self._rotary_cache.clear()
            self._rotary_cache[key] = cached
        return cached


def _rotary(blueprint: LayerBlueprint, config) -> nn.Module | None:
    return blueprint.rotary_cls(config=config) if blueprint.rotary_cls is not None else None
