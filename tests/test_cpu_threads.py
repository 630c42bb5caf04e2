"""CPU inference runs the block's elementwise ops on one thread and its products on all; results are unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch

import nnunetv2_llm.model.block as bottleneck
from nnunetv2_llm.model.block import LLMBottleneckBlock
from nnunetv2_llm.model.network import build_mixer
from nnunetv2_llm.model.spec import make_spec


@pytest.fixture
def block(tiny_llama):
    torch.manual_seed(0)
    spec = make_spec("pretrained", source=str(tiny_llama), layer=1, rank=4)
    block = LLMBottleneckBlock(16, spec.width, spec.rank, build_mixer(spec)).eval()
    torch.nn.init.normal_(block.proj_out.up.weight, std=0.1)  # not the step-0 identity
    return block


def _threads_seen(block: LLMBottleneckBlock, x: torch.Tensor, monkeypatch) -> dict[str, set[int]]:
    """Thread counts in force inside the layer's norms (elementwise), its oneDNN products and its attention."""
    seen = {"norm": set(), "product": set(), "attention": set()}
    conv, sdpa = torch.mkldnn_convolution, torch.nn.functional.scaled_dot_product_attention

    def spy(kind, fn):
        def wrapped(*a, **k):
            seen[kind].add(torch.get_num_threads())
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "mkldnn_convolution", spy("product", conv))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy("attention", sdpa))
    norm = block.mixer.layer.input_layernorm
    handle = norm.register_forward_pre_hook(lambda *_: seen["norm"].add(torch.get_num_threads()))
    try:
        block(x)
    finally:
        handle.remove()
    return seen


def test_a_bfloat16_layers_products_run_on_all_threads(tmp_path, two_threads, monkeypatch):
    """bfloat16 linears are plain ``nn.Linear`` (oneDNN is used only for float32): they also get all threads."""
    from conftest import save_bfloat16_model

    spec = make_spec("pretrained", source=str(save_bfloat16_model(tmp_path / "bf16")), layer=0, rank=4)
    block = LLMBottleneckBlock(16, spec.width, spec.rank, build_mixer(spec)).eval()
    assert block.mixer.compute_dtype == torch.bfloat16
    seen, linear = set(), torch.nn.functional.linear

    def spy(x, weight, *a, **k):
        if weight.dtype == torch.bfloat16:
            seen.add(torch.get_num_threads())
        return linear(x, weight, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        block(torch.randn(1, 16, 3, 4, 3))
    assert seen == {2}


def test_inference_runs_elementwise_on_one_thread_products_on_all(block, two_threads, monkeypatch):
    x = torch.randn(1, 16, 3, 4, 3)
    with torch.no_grad():
        seen = _threads_seen(block, x, monkeypatch)
    assert seen == {"norm": {1}, "product": {2}, "attention": {2}}
    assert torch.get_num_threads() == 2


def test_training_keeps_all_threads(block, two_threads, monkeypatch):
    seen = _threads_seen(block, torch.randn(2, 16, 3, 4, 3), monkeypatch)
    assert seen == {"norm": {2}, "product": {2}, "attention": {2}}


def test_results_are_bit_identical(block, two_threads, monkeypatch):
    x = torch.randn(2, 16, 3, 4, 3)
    with torch.no_grad():
        one_thread = block(x)
        monkeypatch.setattr(bottleneck, "elementwise_on_one_thread", lambda x: contextlib.nullcontext())
        all_threads = block(x)
    assert torch.equal(one_thread, all_threads)


def test_thread_count_is_restored_after_an_error(block, two_threads, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        block(torch.randn(1, 16, 3, 4, 3))
    assert torch.get_num_threads() == 2
    with torch.no_grad():
        monkeypatch.undo()
        block(torch.randn(1, 16, 3, 4, 3))  # no state left behind: works again
    assert torch.get_num_threads() == 2
