"""How many ATen operations the LLM block dispatches in one training step (forward and backward): each one is a
kernel launch on CUDA and an allocation or a loop on the CPU, so for the small bottleneck the count, not the FLOPs,
often sets the block's time.

Counted with a ``TorchDispatchMode``, which sees every operation below autograd (views, copies and the backward's
own operations included; composite operations such as ``linear`` are seen as what they decompose into).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def count_dispatched_ops(fn: Callable[[], object]) -> Counter[str]:
    """The ATen operations ``fn()`` dispatches, by overload name (e.g. ``aten.addmm.default``).

    Args:
        fn: run once under the counter.

    Returns:
        A Counter of operation name -> calls.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with _Counting():
        fn()
    return counts


def forward_backward_counts(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Counter[str]]:
    """Operations of ``module(x)`` and of its backward from a given output gradient, as in a training step (the
    input requires grad: it comes from the encoder; parameter gradients are unset before, as after
    ``zero_grad(set_to_none=True)``). One uncounted step first, so that one-off work (caches such as the rotary
    tables) is not counted: the steady state of training. The input and the output gradient are made outside the
    count.

    Args:
        module: in train mode, on x's device.
        x: (B, C, *spatial) or (B, N, D), the module's input shape.

    Returns:
        ``{"forward": Counter, "backward": Counter}``.
    """
    import torch

    x = x.detach().requires_grad_(True)
    warm = module(x)
    warm.backward(torch.zeros_like(warm))
    for p in module.parameters():
        p.grad = None
    out: dict[str, torch.Tensor] = {}
    forward = count_dispatched_ops(lambda: out.__setitem__("y", module(x)))
    grad = torch.randn_like(out["y"])
    backward = count_dispatched_ops(lambda: out["y"].backward(grad))
    for p in module.parameters():
        p.grad = None
    return {"forward": forward, "backward": backward}


def block_op_counts(trainer: nnUNetTrainer, shape: list[int], device: torch.device) -> dict | None:
    """Operations the trainer's LLM block dispatches in a training step, in total and for its token mixer (the
    frozen layer) alone; the block's own are the difference. None for a network without a block.

    Args:
        trainer: an initialised trainer.
        shape: (B, C, *spatial), the block's input in a training step (the bottleneck).
        device: where the network is.

    Returns:
        ``{"forward", "backward", "total", "mixer", "own", "by_op"}``: counts (``by_op``: the block's operations
        by name, forward and backward together).
    """
    import torch

    from nnunetv2_llm.model.network import unwrap_network

    block = getattr(unwrap_network(trainer.network), "bottleneck", None)
    if block is None:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    block_counts = forward_backward_counts(block, x)
    tokens = torch.randn(shape[0], math.prod(shape[2:]), block.width, generator=gen).to(device)
    mixer_counts = forward_backward_counts(block.mixer, tokens) if any(True for _ in block.mixer.parameters()) \
        else {"forward": Counter(), "backward": Counter()}
    forward, backward = sum(block_counts["forward"].values()), sum(block_counts["backward"].values())
    mixer = sum(mixer_counts["forward"].values()) + sum(mixer_counts["backward"].values())
    return {"forward": forward, "backward": backward, "total": forward + backward, "mixer": mixer,
            "own": forward + backward - mixer,
            "by_op": dict((block_counts["forward"] + block_counts["backward"]).most_common())}
