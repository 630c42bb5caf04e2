"""The bottleneck block: feature map -> tokens -> low-rank projection -> frozen LLM layer -> back -> residual."""

from __future__ import annotations

import torch
from torch import nn


class LowRankProjection(nn.Module):
    """LoRA-style factorised linear map ``in -> rank -> out`` (MedVisionLlama projects with a low-rank adapter).

    ``down`` keeps ``nn.Linear``'s Kaiming-uniform initialisation; ``up`` is zero-initialised when ``zero_init`` is set,
    which makes the whole map output zeros at step 0 (the LoRA "B = 0" convention).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, zero_init: bool = False):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=True)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self.up(self.down(x))


def projection(in_features: int, out_features: int, rank: int, zero_init: bool = False) -> nn.Module:
    """The map into or out of the LLM width: low-rank (``rank`` > 0) or a full ``nn.Linear`` (``rank`` 0, as LLM4Seg and
    Pang et al.); ``zero_init`` makes it output zeros at step 0."""
    if rank > 0:
        return LowRankProjection(in_features, out_features, rank, zero_init)
    linear = nn.Linear(in_features, out_features)
    if zero_init:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return linear


class LLMBottleneckBlock(nn.Module):
    """Residual block around a token mixer (a frozen LLM layer, or ``nn.Identity`` for the no-LLM control); ``rank``
    0 makes the projections full ``nn.Linear`` maps.

    x: (B, C, *spatial) -> tokens (B, N, C), N = prod(spatial) in raster order -> proj_in (B, N, D)
    -> mixer (B, N, D) -> proj_out (B, N, C) -> back to (B, C, *spatial) -> x + that.
    ``proj_out`` is zero-initialised, so at step 0 the block is the identity and the network equals the
    plain nnU-Net network. The block runs in float32 (or the layer's dtype) with autocast disabled: it is
    a small share of the FLOPs, and fp16 must not overflow the LLM's residual stream.
    """

    def __init__(self, channels: int, width: int, rank: int, mixer: nn.Module):
        super().__init__()
        self.width = width
        self.proj_in = projection(channels, width, rank)
        self.mixer = mixer
        self.proj_out = projection(width, channels, rank, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> (B, C, *spatial), same dtype as x."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            b, c = x.shape[:2]
            flat = x.float().flatten(2)  # (B, C, N), converted once (a no-op for float32 input)
            n = flat.shape[2]
            # The projections see (B*N, features) matrices: each linear is then one (add)mm, without the views that
            # a 3-d input costs around every matmul in forward and backward.
            tokens = flat.transpose(1, 2).reshape(b * n, c)  # the one layout copy into token order
            mixed = self.mixer(self.proj_in(tokens).view(b, n, self.width)).float()  # (B, N, D)
            projected = self.proj_out(mixed.reshape(b * n, self.width)).view(b, n, c)
            # adding the (B, N, C) result through a transposed view writes (B, C, N) directly: no extra copy
            out = (flat + projected.transpose(1, 2)).reshape(x.shape)
            if x.dtype in (torch.float16, torch.bfloat16):  # saturate rather than overflow to inf on the cast
                limit = torch.finfo(x.dtype).max
                out = out.clamp(-limit, limit)
            return out.to(x.dtype)
