"""``nn.Linear`` whose float32 CPU forward runs as oneDNN's 1x1 convolution instead of the BLAS (MKL's sgemm).

Why (issue 4, BENCHMARKS.md): PyTorch sends a float32 ``nn.Linear`` on CPU to MKL's sgemm. On the AMD EPYC
benchmark machine that runs the frozen layer's shapes (175 tokens x 576 x 1,536) at 170 to 190 GFLOP/s, while
oneDNN's 1x1 convolution over the same numbers reaches 280 to 350 GFLOP/s (forward and backward); nnU-Net's own
convolutions already run on oneDNN. oneDNN is called directly (``torch.mkldnn_convolution``): ``F.conv2d`` picks
its backend by heuristics and sent 64-channel inputs to a slow reference kernel. Only the frozen layer's linears
use it (also faster at a 384-wide BERT layer's shapes: 270 against 160 GFLOP/s); the rank-64 projections are
slower this way.
Same parameters and state-dict keys as ``nn.Linear``; results agree to float32 rounding. On other devices and
dtypes (CUDA, bfloat16, which PyTorch already sends to oneDNN on CPU) and under torch.compile it is ``nn.Linear``
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2_llm.model.cpu_threads import all_threads


class OneDNNLinear(nn.Linear):
    """x: (..., in_features) -> (..., out_features), as ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
                or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)):
            # torch.compile traces nn.Linear (the oneDNN op has no fake-tensor kernel); a user's
            # torch.backends.mkldnn.flags(enabled=False) is honoured
            with all_threads():
                return super().forward(x)
        lead = x.shape[:-1]
        # every token is one pixel of a (1, in, M, 1) image in channels-last layout: no copy, and oneDNN keeps that
        # layout, so its output permuted back is (M, out) row-major again
        pixels = x.reshape(1, -1, 1, self.in_features).permute(0, 3, 1, 2)
        weight = self.weight.view(self.out_features, self.in_features, 1, 1)
        with all_threads():
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
