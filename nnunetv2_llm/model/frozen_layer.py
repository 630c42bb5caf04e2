"""One frozen LLM transformer layer, run stand-alone on image tokens.

Choices (documented in the README):
- Families: any transformers language-model family that ``llm.families`` accepts (dense attention layers; the
  refused ones and why: ``nnunetv2_llm info --list-families``).
- Attention is bidirectional for every family: every attention module's ``is_causal`` is set to False, no mask is
  passed, and attention that goes through transformers' interface (eager or SDPA) is routed to
  ``llm.bidirectional.bidirectional_sdpa``, which passes ``is_causal=False`` explicitly (transformers' decoder layers
  are causal by default and SDPA silently applies that when no mask is given), implements Gemma-2's logit
  soft-capping, and, for float32 on CUDA (no grouped-query SDPA kernel exists there), repeats the key/value heads so
  that the memory-efficient kernel runs instead of the unfused math fallback. A layer whose attention calls SDPA
  itself instead of the interface (Falcon) keeps its SDPA call, made non-causal by ``is_causal=False``. Every
  layer is checked on 3 tokens when built: its first token must see its last (``checked_bidirectional``).
- Sliding-window layers (Mistral, Gemma-2/3, Qwen2 with a window, Starcoder2, ModernBERT's local layers...) attend
  to ALL bottleneck tokens, also when there are more tokens than the window: the window is a causal-decoding
  memory limit applied through the mask, and every image token should see every other one. (A Mistral window of
  4096 is far above a bottleneck's few hundred tokens anyway.)
- Positions (``llm.positions``): rotary families get their own rotary tables over the raster order of the
  bottleneck voxels (the scheme the layer was pre-trained with), partial rotary included, with the base of the
  layer's attention type where the model has several (Gemma-3 local and global). Learned absolute positions
  (GPT-2, BioGPT, BERT, RoBERTa...) live in the model's embedding layer, which is not used: those layers take no
  positions. The tables depend only on the token count, device and dtype, so they are computed once per
  combination and reused.
- Numerics: the layer runs with autocast disabled in its own dtype (float32 for GGUF and float32 sources,
  bfloat16 for bfloat16 and float16 sources, unless the trainer asks for bfloat16: ``nnUNetTrainerLLM_bf16``),
  so nnU-Net's fp16 autocast on CUDA cannot overflow it.
- Linears are ``nn.Linear`` (GPT-2 style families: transformers' ``Conv1D``); ``nnUNet_LLM_ONEDNN=1`` opts in to
  ``onednn_linear`` on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.llm.bidirectional import make_bidirectional
from nnunetv2_llm.llm.blueprint import (
    FamilyRefused,
    LayerBlueprint,
    check_layer,
    instantiate_layer,
    layer_arguments,
    layer_from_state_dict,
)
from nnunetv2_llm.llm.positions import PositionInputs
from nnunetv2_llm.model.onednn_linear import onednn_requested, use_onednn_linears

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_ROTARY_CACHE_SIZE = 8


def weights_dtype(source_dtype: torch.dtype) -> torch.dtype:
    """Storage and compute dtype for the frozen layer: float16 becomes bfloat16 (same bytes, fp32 range)."""
    return torch.bfloat16 if source_dtype in (torch.float16, torch.bfloat16) else torch.float32


class FrozenLLMLayer(nn.Module):
    """A frozen pre-trained (or frozen random) LLM layer: tokens (B, N, D) -> tokens (B, N, D)."""

    def __init__(self, layer: nn.Module, positions: PositionInputs, rotary: nn.Module | None):
        super().__init__()
        self.layer = layer
        self.positions = positions
        self.rotary = rotary  # a module (moves with .to()); its tables are buffers outside the state dict
        self.compute_dtype = next(layer.parameters()).dtype
        make_bidirectional(self.layer, positions.attention)
        if onednn_requested():
            use_onednn_linears(self.layer)
        self.layer.requires_grad_(False)
        self.layer.eval()
        self._arguments_cache: dict = {}  # not a buffer: not in the state dict, rebuilt on any device

    @classmethod
    def from_state_dict(cls, blueprint: LayerBlueprint, config: PretrainedConfig, index: int,
                        state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> "FrozenLLMLayer":
        """The layer holding ``state_dict``'s tensors (keys relative to the layer) in ``dtype``, the spec's (no
        second copy where they already are in it)."""
        positions = check_layer(blueprint, config, index)
        layer = cls(layer_from_state_dict(blueprint, config, index, state_dict, dtype), positions,
                    positions.rotary(config))
        return layer.checked_bidirectional(config)

    @classmethod
    def random(cls, blueprint: LayerBlueprint, config: PretrainedConfig, index: int, seed: int,
               dtype: torch.dtype = torch.float32) -> "FrozenLLMLayer":
        """The same architecture, randomly initialised as transformers initialises LLMs
        (linear weights ~ N(0, initializer_range), biases 0, norms 1), with a fixed seed."""
        from transformers.pytorch_utils import Conv1D

        positions = check_layer(blueprint, config, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = instantiate_layer(blueprint, config, index, dtype)
            std = getattr(config, "initializer_range", 0.02)
            for module in layer.modules():
                if isinstance(module, (nn.Linear, Conv1D)):
                    nn.init.normal_(module.weight, 0.0, std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        return cls(layer.to(dtype), positions, positions.rotary(config)).checked_bidirectional(config)

    def checked_bidirectional(self, config: PretrainedConfig) -> "FrozenLLMLayer":
        """This layer, after checking on 3 random tokens that its first token sees its last one: a family whose
        attention keeps a causal mask of its own that ``make_bidirectional`` does not open is refused here, with
        its real weights (two forward passes of 3 tokens: milliseconds).

        Raises:
            LLMSettingError: the first token's output does not depend on the last token.
        """
        param = next(self.layer.parameters())
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(2, 3, config.hidden_size, generator=generator)
        tokens[1, :-1] = tokens[0, :-1]  # the second sequence differs from the first only in its last token
        with torch.no_grad():
            first = self(tokens.to(param.device, self.compute_dtype))[:, 0].float()
        if (first[0] - first[1]).abs().max() <= 1e-6 * first.abs().max():
            raise FamilyRefused(config, "its attention stays causal (a causal mask of its own), not bidirectional")
        return self

    def train(self, mode: bool = True) -> "FrozenLLMLayer":
        """The frozen layer always runs in eval mode (no dropout, e.g. BERT's 0.1): the same function in
        training and inference. Trainable LoRA adapters are built without dropout."""
        super().train(mode)
        self.layer.eval()
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) in any dtype -> (B, N, D) in the layer's dtype, bidirectional attention."""
        h = tokens.to(self.compute_dtype)
        out = self.layer(h, **self._arguments(h))
        return out[0] if isinstance(out, tuple) else out

    def _arguments(self, h: torch.Tensor) -> dict:
        """The layer call's keyword arguments for tokens ``h`` (B, N, D): ``blueprint.layer_arguments``, whose
        positions (1, N) and rotary tables (1, N, rotary dim) broadcast over the batch and depend only on N, device
        and dtype, so they are computed once and reused (under torch.compile they are computed in the graph, where
        the compiler folds them)."""
        if torch.compiler.is_compiling():
            return layer_arguments(self.positions, self.rotary, h)
        key = (h.shape[1], h.device, h.dtype, torch.is_inference_mode_enabled())  # inference tensors: no autograd
        cached = self._arguments_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = layer_arguments(self.positions, self.rotary, h)
            if len(self._arguments_cache) >= _ROTARY_CACHE_SIZE:
                self._arguments_cache.clear()
            self._arguments_cache[key] = cached
        return cached
