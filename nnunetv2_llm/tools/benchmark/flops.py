"""FLOPs of one training step (``torch.utils.flop_counter``) for the whole network, the LLM block and its layer,
and the device's measured matrix-multiply rate, from which the floor (the layer's FLOPs at that rate) follows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nnunetv2_llm.tools.benchmark.trainers import sync

if TYPE_CHECKING:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.utils.flop_counter import FlopCounterMode


def _flop_counter() -> FlopCounterMode:
    """torch's counter with attention counted as 0 (``attention_training_flops`` adds it analytically: the counter's
    SDPA formulas assert equal query and key/value heads, and the CPU kernel is not counted at all) and with a
    formula for oneDNN's direct convolution, which the frozen layer's linears may call on CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, flop_registry

    def no_flops(*args, out_shape=None, **kwargs):
        return 0

    def onednn_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    mapping = {op: no_flops for op in flop_registry if "attention" in str(op)}
    mapping[torch.ops.aten.mkldnn_convolution] = onednn_conv_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def _bottleneck_input_shape(block: torch.nn.Module | None) -> Iterator[dict[str, tuple[int, ...]]]:
    """Yields a dict whose ``shape`` is set to the shape of the block's input (B, C, *spatial) once it runs."""
    seen: dict[str, tuple[int, ...]] = {}
    hook = None
    if block is not None:
        hook = block.register_forward_hook(lambda m, inp, out: seen.__setitem__("shape", tuple(inp[0].shape)))
    try:
        yield seen
    finally:
        if hook is not None:
            hook.remove()


def _has_layer(mixer: torch.nn.Module | None) -> bool:
    """Whether the mixer holds an LLM layer (the no-LLM control's ``nn.Identity`` has no parameters)."""
    return mixer is not None and any(True for _ in mixer.parameters())


def count_flops(trainer: nnUNetTrainer, batch: dict, device: torch.device) -> dict[str, int | list[int] | None]:
    """FLOPs of one training step's forward + backward (no optimizer step), whole network and LLM block."""
    import torch

    from nnunetv2_llm.model.network import unwrap_network

    net = unwrap_network(trainer.network)
    net.train()
    block = getattr(net, "bottleneck", None)
    data = batch["data"].to(device)
    target = batch["target"]
    target = [t.to(device) for t in target] if isinstance(target, list) else target.to(device)
    counter = _flop_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    try:
        with _bottleneck_input_shape(block) as seen, counter:
            with torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext():
                loss = trainer.loss(net(data), target)
            loss.backward()
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    block_flops = max((v for k, v in per_module.items() if k.endswith(".bottleneck")), default=0)
    # A parameter-free mixer (nn.Identity) returns its input tensor itself, which confuses the flop counter's
    # module tracking in backward (later ops get attributed to it): it has no FLOPs of its own.
    mixer = getattr(block, "mixer", None)
    has_layer = _has_layer(mixer)
    layer_flops = max((v for k, v in per_module.items() if k.endswith(".bottleneck.mixer")), default=0) \
        if has_layer else 0
    shape = seen.get("shape")
    n_tokens = 0
    if shape is not None:
        n_tokens = shape[0]
        for s in shape[2:]:
            n_tokens *= s
    attention_added = 0
    if has_layer and shape is not None:
        attention_added = attention_training_flops(mixer, shape[0], n_tokens // shape[0])
    total = int(counter.get_total_flops()) + attention_added
    return {"total": total, "block": int(block_flops) + attention_added,
            "llm_layer": int(layer_flops) + attention_added, "attention_added_analytically": attention_added,
            "bottleneck_shape": list(shape) if shape else None, "tokens_per_step": int(n_tokens)}


def attention_training_flops(mixer: torch.nn.Module, batch: int, tokens: int) -> int:
    """Attention matmuls of one layer in a training step: forward QK^T and AV (2 x 2 B N^2 H d), backward
    twice that (gradients of inputs only: the weights are frozen). The heads come from the config of the layer's
    attention module (``self_attn`` in decoders, ``attention.self`` in BERT); 0 without a layer (no-LLM control)."""
    layer = getattr(mixer, "layer", None)
    config = next((m.config for m in layer.modules() if hasattr(getattr(m, "config", None), "num_attention_heads")),
                  None) if layer is not None else None
    if config is None:
        return 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 3 * 4 * batch * tokens * tokens * heads * head_dim


def layer_linear_class(network: torch.nn.Module) -> type[torch.nn.Linear]:
    """The class of the frozen layer's linears (``nn.Linear`` or a subclass the layer swapped in); ``nn.Linear``
    for a network without a layer."""
    from torch import nn

    from nnunetv2_llm.model.network import unwrap_network

    mixer = getattr(getattr(unwrap_network(network), "bottleneck", None), "mixer", None)
    modules = mixer.modules() if mixer is not None else ()
    return next((type(m) for m in modules if isinstance(m, nn.Linear)), nn.Linear)


def matmul_rate(device: torch.device, dtype_name: str, m: int, k: int, n: int, seconds: float = 1.0,
                linear_class: type[torch.nn.Linear] | None = None) -> float:
    """Measured FLOP/s of an (m x k) @ (k x n) product in ``dtype_name`` on ``device`` (median of repeats), run by
    ``linear_class`` (default ``nn.Linear``; pass the frozen layer's own, ``layer_linear_class``, so that the floor
    uses the rate the layer can reach)."""
    import statistics

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(m, k, device=device).to(dtype)
    linear = (linear_class or torch.nn.Linear)(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    for _ in range(3):
        linear(a)
    sync(device)
    samples = []
    budget_end = time.perf_counter() + seconds
    while len(samples) < 5 or (time.perf_counter() < budget_end and len(samples) < 200):
        sync(device)
        start = time.perf_counter()
        linear(a)
        sync(device)
        samples.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(samples)


def matmul_rates(layers: dict[str, tuple[str, dict | None, type[torch.nn.Linear]]], flops: dict[str, dict],
                 device: torch.device) -> dict[str, dict]:
    """Per layer dtype: the matmul rate at the layer's shape (tokens x width x intermediate) and at a large square
    shape, and the higher of the two (``peak_flops_per_s``). ``layers``: per trainer with a layer, its dtype, its
    LLM settings (``width``, ``intermediate``) and its linear class; the first trainer of each dtype is measured."""
    rates: dict[str, dict] = {}
    tokens = max((f["tokens_per_step"] for f in flops.values()), default=1024) or 1024
    big = 8192 if device.type == "cuda" else 2048
    for dtype, llm, linear_class in layers.values():
        if dtype in rates:
            continue
        width = (llm or {}).get("width", 1024)
        inter = (llm or {}).get("intermediate") or 4 * width
        shape_rate = matmul_rate(device, dtype, tokens, width, inter, linear_class=linear_class)
        square_rate = matmul_rate(device, dtype, big, big, big, linear_class=linear_class)
        rates[dtype] = {"layer_shape": [tokens, width, inter], "layer_shape_flops_per_s": shape_rate,
                        "square": big, "square_flops_per_s": square_rate,
                        "peak_flops_per_s": max(shape_rate, square_rate)}
    return rates
