"""Opt-in CPU path (``nnUNet_LLM_ONEDNN=1``): the frozen layer's float32 linears as oneDNN 1x1 convolutions.

PyTorch sends a float32 ``nn.Linear`` on the CPU to the BLAS; ``OneDNNLinear`` calls oneDNN's convolution
directly (``torch.mkldnn_convolution``: ``F.conv2d`` picks its backend by heuristics and can choose a reference
kernel), which is faster on some CPUs at the frozen layer's shapes (BENCHMARKS.md). The switch is read when the
frozen layer is built; by default the layer keeps ``nn.Linear``.
Same parameters and state-dict keys as ``nn.Linear``; results agree to float32 rounding. On other devices and
dtypes (CUDA, bfloat16, which PyTorch already sends to oneDNN on the CPU) and under torch.compile it is
``nn.Linear`` unchanged.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ENV_ONEDNN = "nnUNet_LLM_ONEDNN"


def onednn_requested() -> bool:
    """Whether the user opted in to oneDNN linears in the frozen layer (``nnUNet_LLM_ONEDNN=1``)."""
    return os.environ.get(ENV_ONEDNN, "").strip().lower() in ("1", "true", "yes")


class OneDNNLinear(nn.Linear):
    """x: (..., in_features) -> (..., out_features), as ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
                or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)):
            # torch.compile traces nn.Linear (the oneDNN op has no fake-tensor kernel); a user's
            # torch.backends.mkldnn.flags(enabled=False) is honoured
            return super().forward(x)
        lead = x.shape[:-1]
        # every token is one pixel of a (1, in, M, 1) image in channels-last layout: no copy, and oneDNN keeps that
        # layout, so its output permuted back is (M, out) row-major again
        pixels = x.reshape(1, -1, 1, self.in_features).permute(0, 3, 1, 2)
        weight = self.weight.view(self.out_features, self.in_features, 1, 1)
        out = torch.mkldnn_convolution(pixels, weight, self.bias, [0, 0], [1, 1], [1, 1], 1)
        return out.permute(0, 2, 3, 1).reshape(*lead, self.out_features)


def use_onednn_linears(module: nn.Module) -> None:
    """Replace every plain ``nn.Linear`` inside ``module`` by an ``OneDNNLinear`` holding the same parameters."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = OneDNNLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fast.weight, fast.bias = child.weight, child.bias
                setattr(parent, name, fast)
