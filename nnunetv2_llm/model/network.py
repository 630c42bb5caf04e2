"""nnU-Net's planned network with the LLM bottleneck block inserted on the deepest encoder features."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.model.block import LLMBottleneckBlock
from nnunetv2_llm.model.frozen_stack import frozen_mixer, read_stack_state_dict
from nnunetv2_llm.model.spec import BottleneckSpec


class LLMBottleneckUNet(nn.Module):
    """Wraps a dynamic-network-architectures U-Net (PlainConvUNet, ResidualEncoderUNet, ...).

    Keeps its ``encoder`` and ``decoder`` as they are (same state-dict keys, same ``decoder.deep_supervision``
    switch nnU-Net toggles) and applies ``bottleneck`` to the last skip, i.e. the deepest features.
    x: (B, C_in, *patch) -> logits (B, K, *patch), or a list of them with deep supervision.
    """

    def __init__(self, unet: nn.Module, bottleneck: LLMBottleneckBlock):
        super().__init__()
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x (B, C_in, *patch) -> logits (B, classes, *patch), or with deep supervision one per decoder stage,
        full resolution first (as nnU-Net's network)."""
        skips = self.encoder(x)
        return self.decoder([*skips[:-1], self.bottleneck(skips[-1])])


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


# layer_sha256 -> the layer's tensors, already read by make_spec_and_layer; taken by the next build for that layer
_layers_read: dict[str, dict[str, torch.Tensor]] = {}


@contextlib.contextmanager
def reuse_layer(spec: BottleneckSpec, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside this block, the first network built for ``spec`` takes its frozen tensors from ``state`` (what
    ``make_spec_and_layer`` read and checksummed) instead of reading the source again. nnU-Net builds the
    network in a static method that sees only the plans, hence this hand-over; nothing is kept after the block."""
    if state is None:  # not 'pretrained': nothing was read for the network
        yield
        return
    _layers_read[spec.layer_sha256] = state
    try:
        yield
    finally:
        untaken = _layers_read.pop(spec.layer_sha256, None)
    if untaken is not None:  # the network would hold other weights than the ones read and checksummed
        raise RuntimeError("nnunetv2_llm: the network build did not take the frozen layer that was read")


def build_mixer(spec: BottleneckSpec, from_checkpoint: bool = False) -> nn.Module:
    """The token mixer the spec asks for. For 'pretrained', weights come from ``reuse_layer``; else, with
    ``from_checkpoint`` (the caller loads a checkpoint's ``network_weights`` next, as nnU-Net's predictor does),
    a placeholder of the right shape and dtype is built and the source is never read (it may be absent, or
    hold another model by now); without it, the layers are read from the source."""
    if spec.mixer == "identity":
        return nn.Identity()
    config = spec.hf_config()
    blueprint = layer_blueprint(config)
    state = _layers_read.pop(spec.layer_sha256, None) if spec.mixer == "pretrained" else None
    if state is None and spec.mixer == "pretrained" and not from_checkpoint:
        state = read_stack_state_dict(Path(spec.source), config, spec.layers, blueprint)
    mixer = frozen_mixer(blueprint, config, spec.layers, getattr(torch, spec.dtype), state, spec.seed)
    if spec.lora_rank > 0:
        add_lora(mixer, spec.lora_rank, spec.lora_alpha)
    if spec.train_layer:
        mixer.layer.requires_grad_(True)
    return mixer


def add_lora(mixer: nn.Module, rank: int, alpha: int) -> None:
    """peft LoRA adapters on every linear (or GPT-2 Conv1D) of the frozen layer (or stack); only the adapters
    train."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    linears = [(name, m) for name, m in mixer.layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    targets = sorted({name.split(".")[-1] for name, _ in linears})
    transposed = any(isinstance(m, Conv1D) for _, m in linears)  # GPT-2's Conv1D stores (in, out) weights
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                       fan_in_fan_out=transposed), mixer.layer)
    for name, param in mixer.layer.named_parameters():
        trainable = "lora_" in name
        if trainable and param.dtype != torch.float32:  # peft makes adapters in the layer's dtype; bf16 adapters lose
            param.data = param.data.float()  # most SGD updates (PeftModel upcasts them to float32 too)
        param.requires_grad_(trainable)


def build_llm_unet(spec: BottleneckSpec, unet: nn.Module, from_checkpoint: bool = False) -> LLMBottleneckUNet:
    """Insert the block described by ``spec`` into an already built nnU-Net network (``from_checkpoint``: see
    ``build_mixer``)."""
    channels = unet.encoder.output_channels[-1]
    block = LLMBottleneckBlock(channels, spec.width, spec.rank, build_mixer(spec, from_checkpoint))
    return LLMBottleneckUNet(unet, block)
