"""nnU-Net compiles the network on CUDA (``nnUNet_compile``, its default): the block must trace as one graph.

A graph break inside ``LLMBottleneckBlock.forward`` makes dynamo run the whole block eagerly, silently, with its
~170 small kernels dispatched from Python (BENCHMARKS.md). ``fullgraph=True`` turns any break into an error.
``aot_eager`` traces forward and backward as inductor would, without compiling kernels, so this runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from nnunetv2_llm.model.block import LLMBottleneckBlock
from nnunetv2_llm.model.network import build_llm_unet, build_mixer
from nnunetv2_llm.model.spec import LLMChoice, make_spec


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


def _spec(request, kind: str):
    family, _, variant = kind.partition("-")
    source = str(request.getfixturevalue(f"tiny_{family}" if family != "identity" else "tiny_llama"))
    mixer = {"identity": "identity", "random": "random"}.get(family if family == "identity" else variant,
                                                              "pretrained")
    return make_spec(LLMChoice(mixer, source=source, layer=1, rank=4, lora_rank=4 if variant == "lora" else 0))


@pytest.mark.parametrize("kind", ["llama", "llama-lora", "llama-random", "bert", "identity"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_block_traces_as_one_graph(request, kind, grad):
    torch.manual_seed(0)
    spec = _spec(request, kind)
    block = LLMBottleneckBlock(16, spec.width, spec.rank, build_mixer(spec)).train(grad)
    torch.nn.init.normal_(block.proj_out.up.weight, std=0.1)  # not the step-0 identity
    x = torch.randn(2, 16, 3, 4, 3, requires_grad=grad)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        out, expected = compiled(x), block(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if grad:
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_whole_network_traces_as_one_graph(tiny_llama):
    from test_network import tiny_unet

    torch.manual_seed(0)
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4))
    net = build_llm_unet(spec, tiny_unet(3))
    x = torch.randn(2, 1, 16, 16, 16)
    torch._dynamo.reset()
    outputs = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    for got, want in zip(outputs, net(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
