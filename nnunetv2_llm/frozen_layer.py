"""One frozen LLM transformer layer, run stand-alone on image tokens.

Choices (documented in the README):
- Attention is bidirectional: every attention module's ``is_causal`` is set to False and no mask is passed,
  so SDPA, eager and flash backends all attend to every token (transformers' decoder layers are causal
  by default and SDPA silently applies that when no mask is given).
- Positions: decoder families get rotary embeddings over the raster order of the bottleneck voxels
  (the position scheme the layer was pre-trained with); BERT layers take no positions (BERT's absolute
  position embeddings live in its embedding layer, which is not used).
- Numerics: the layer runs with autocast disabled in its own dtype (float32 for GGUF and float32 sources,
  bfloat16 for bfloat16 and float16 sources), so nnU-Net's fp16 autocast on CUDA cannot overflow it.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2_llm.llm_source import LayerBlueprint, instantiate_layer


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
        self.layer.requires_grad_(False)

    @classmethod
    def from_state_dict(cls, blueprint: LayerBlueprint, config, index: int,
                        state_dict: dict[str, torch.Tensor]) -> "FrozenLLMLayer":
        """Build the layer on the meta device and assign the loaded tensors (no second copy)."""
        dtype = weights_dtype(next(iter(state_dict.values())).dtype)
        layer = instantiate_layer(blueprint, config, index, "meta")
        layer.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        return cls(layer, _rotary(blueprint, config))

    @classmethod
    def random(cls, blueprint: LayerBlueprint, config, index: int, seed: int,
               dtype: torch.dtype = torch.float32) -> "FrozenLLMLayer":
        """The same architecture, randomly initialised as transformers initialises LLMs
        (linear weights ~ N(0, initializer_range), biases 0, norms 1), with a fixed seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = instantiate_layer(blueprint, config, index, "cpu")
            std = getattr(config, "initializer_range", 0.02)
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        return cls(layer.to(dtype), _rotary(blueprint, config))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) in any dtype -> (B, N, D) in the layer's dtype, bidirectional attention."""
        h = tokens.to(self.compute_dtype)
        kwargs = {}
        if self.rotary is not None:
            positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
            kwargs = {"position_ids": positions, "position_embeddings": self.rotary(h, positions)}
        out = self.layer(h, attention_mask=None, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _rotary(blueprint: LayerBlueprint, config) -> nn.Module | None:
    return blueprint.rotary_cls(config=config) if blueprint.rotary_cls is not None else None
