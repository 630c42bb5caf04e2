"""OneDNNLinear (opt-in, nnUNet_LLM_ONEDNN=1): the frozen layer's linears computed by oneDNN on CPU, same function
and parameters as nn.Linear; by default the frozen layer keeps nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_llm.model.network import build_mixer
from nnunetv2_llm.model.onednn_linear import ENV_ONEDNN, OneDNNLinear, use_onednn_linears
from nnunetv2_llm.model.spec import LLMChoice, make_spec

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (2, 13), (3, 5, 11)])
def test_matches_nn_linear_forward_and_backward(bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    fast = nn.Sequential(plain)
    use_onednn_linears(fast)
    assert type(fast[0]) is OneDNNLinear and fast[0].weight is plain.weight  # same parameter, no copy
    x = torch.randn(*shape, 24, requires_grad=True)
    grad_out = torch.randn(*shape, 40)
    expected = plain(x)
    (expected * grad_out).sum().backward()
    expected_grads = [x.grad.clone()] + [p.grad.clone() for p in plain.parameters()]
    x.grad = None
    plain.zero_grad(set_to_none=True)
    out = fast(x)
    (out * grad_out).sum().backward()
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip([x.grad] + [p.grad for p in plain.parameters()], expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_nn_linear_unchanged():
    layer = OneDNNLinear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.fixture
def pretrained_spec(tiny_llama):
    return make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=0, rank=4))


def test_frozen_layer_uses_nn_linear_by_default(pretrained_spec, monkeypatch):
    monkeypatch.delenv(ENV_ONEDNN, raising=False)
    linears = [m for m in build_mixer(pretrained_spec).layer.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)


def test_opt_in_frozen_layer_uses_it_with_unchanged_state_dict_keys(pretrained_spec, monkeypatch):
    monkeypatch.setenv(ENV_ONEDNN, "1")
    mixer = build_mixer(pretrained_spec)
    monkeypatch.delenv(ENV_ONEDNN)
    plain = build_mixer(pretrained_spec)
    linears = [m for m in mixer.layer.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert mixer.layer.state_dict().keys() == plain.layer.state_dict().keys()  # checkpoints load either way
    assert not any(p.requires_grad for p in mixer.parameters())
    tokens = torch.randn(2, 5, pretrained_spec.width)
    torch.testing.assert_close(mixer(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_traces_under_torch_compile_as_nn_linear():
    """torch.compile (nnU-Net's default on CUDA; possible on CPU) cannot trace the oneDNN op with fake tensors."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 40))
    use_onednn_linears(layer)
    x = torch.randn(2, 5, 24)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_honours_onednn_switched_off():
    layer = OneDNNLinear(8, 4)
    x = torch.randn(3, 8)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
