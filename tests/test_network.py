"""The bottleneck block inside nnU-Net's planned networks: shapes, frozen/trainable split, step-0 identity."""

from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunetv2_llm.model.block import LLMBottleneckBlock
from nnunetv2_llm.model.network import build_llm_unet
from nnunetv2_llm.model.spec import LLMChoice, make_spec


def tiny_unet(dim: int, residual: bool = False, in_channels: int = 1) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    kwargs = dict(input_channels=in_channels, n_stages=3, features_per_stage=(8, 16, 32), conv_op=conv,
                  kernel_sizes=3, strides=(1, 2, 2), num_classes=3, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if residual:
        return ResidualEncoderUNet(n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), **kwargs)
    return PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **kwargs)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4))


@pytest.mark.parametrize("dim,residual,shape", [(2, False, (2, 1, 32, 24)), (3, False, (2, 1, 16, 24, 16)),
                                                (3, True, (1, 1, 16, 16, 24)), (2, True, (1, 1, 16, 16))])
def test_output_shapes_match_plain_network(spec, dim, residual, shape):
    torch.manual_seed(0)
    net = build_llm_unet(spec, tiny_unet(dim, residual))
    outputs = net(torch.randn(*shape))
    assert isinstance(outputs, (list, tuple)) and len(outputs) == 2  # deep supervision: one head per decoder stage
    assert outputs[0].shape == (shape[0], 3, *shape[2:])
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled toggles
    assert net(torch.randn(*shape)).shape == (shape[0], 3, *shape[2:])


def test_step0_equals_plain_network(spec):
    torch.manual_seed(0)
    unet = tiny_unet(3)
    plain = copy.deepcopy(unet).eval()
    net = build_llm_unet(spec, unet).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    for a, b in zip(net(x), plain(x), strict=True):
        assert torch.equal(a, b)
    # and the block does act once its output projection is non-zero
    nn.init.normal_(net.bottleneck.proj_out.up.weight)
    assert not torch.allclose(net(x)[0], plain(x)[0])


def test_state_dict_keeps_nnunet_keys(spec):
    unet = tiny_unet(3)
    net = build_llm_unet(spec, unet)
    plain_keys = set(unet.state_dict())
    keys = set(net.state_dict())
    assert plain_keys <= keys
    assert {k.split(".")[0] for k in keys - plain_keys} == {"bottleneck"}


def trainable_and_frozen(net: nn.Module) -> tuple[set[str], set[str]]:
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_frozen_layer_and_gradients(spec):
    net = build_llm_unet(spec, tiny_unet(3))
    trainable, frozen = trainable_and_frozen(net)
    assert frozen and all(n.startswith("bottleneck.mixer.layer.") for n in frozen)
    assert {"bottleneck.proj_in.down.weight", "bottleneck.proj_out.up.weight"} <= trainable
    nn.init.normal_(net.bottleneck.proj_out.up.weight, std=0.1)  # past step 0, so every projection gets gradient
    sum(o.float().mean() for o in net(torch.randn(2, 1, 16, 16, 16))).backward()
    params = dict(net.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    for name in ("bottleneck.proj_in.down.weight", "bottleneck.proj_in.up.weight", "bottleneck.proj_out.down.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0


def test_lora_adapters_are_the_only_trainable_layer_weights(tiny_llama):
    lora = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=0, rank=4, lora_rank=2))
    net = build_llm_unet(lora, tiny_unet(3))
    trainable, frozen = trainable_and_frozen(net)
    in_layer = {n for n in trainable if n.startswith("bottleneck.mixer.layer.")}
    assert in_layer and all("lora_" in n for n in in_layer)
    assert {n for n in frozen if "lora_" in n} == set()
    # LoRA B is zero-initialised by peft: the adapted layer starts as the pre-trained one
    plain = build_llm_unet(make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=0, rank=4)),
                           tiny_unet(3))
    tokens = torch.randn(1, 10, 64)
    assert torch.allclose(net.bottleneck.mixer(tokens), plain.bottleneck.mixer(tokens), atol=1e-6)


def test_controls_share_the_trainable_parameters(tiny_llama):
    counts = {}
    for mixer in ("pretrained", "random", "identity"):
        net = build_llm_unet(make_spec(LLMChoice(mixer, source=str(tiny_llama), layer=1, rank=4)), tiny_unet(3))
        counts[mixer] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert counts["pretrained"] == counts["random"] == counts["identity"]


def test_random_control_differs_from_pretrained_but_is_reproducible(tiny_llama):
    nets = [build_llm_unet(make_spec(LLMChoice(m, source=str(tiny_llama), layer=1, rank=4)), tiny_unet(3))
            for m in ("pretrained", "random", "random")]
    weights = [n.bottleneck.mixer.layer.self_attn.q_proj.weight for n in nets]
    assert not torch.equal(weights[0], weights[1])
    assert torch.equal(weights[1], weights[2])
    assert weights[1].std().item() == pytest.approx(0.02, rel=0.2)  # transformers' initializer_range


def test_block_is_bidirectional(spec):
    from nnunetv2_llm.model.network import build_mixer

    mixer = build_mixer(spec)
    tokens = torch.randn(1, 12, 64)
    changed = tokens.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(mixer(tokens)[:, 0], mixer(changed)[:, 0])


def test_cascade_style_extra_input_channels(spec):
    """3d_cascade_fullres feeds the previous stage's one-hot segmentation as extra input channels."""
    net = build_llm_unet(spec, tiny_unet(3, in_channels=4))
    assert net(torch.randn(1, 4, 16, 16, 16))[0].shape == (1, 3, 16, 16, 16)


def test_rebuild_without_source_then_checkpoint_restores_outputs(spec, tmp_path):
    """Prediction on a machine without the LLM source: the plans' spec rebuilds a placeholder layer and the
    checkpoint's weights make the network identical."""
    torch.manual_seed(0)
    trained = build_llm_unet(spec, tiny_unet(3)).eval()
    nn.init.normal_(trained.bottleneck.proj_out.up.weight, std=0.1)
    moved = copy.deepcopy(spec)
    moved.source = str(tmp_path / "gone")
    rebuilt = build_llm_unet(moved, tiny_unet(3), from_checkpoint=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert not torch.allclose(rebuilt(x)[0], trained(x)[0])
    rebuilt.load_state_dict(trained.state_dict())
    assert torch.equal(rebuilt(x)[0], trained(x)[0])


def test_rebuild_for_a_checkpoint_never_reads_the_source(spec, tmp_path, monkeypatch):
    """The predictor's build: the source path may now hold another model (here a wider one); it is not read."""
    from conftest import save_tiny_model


    trained = build_llm_unet(spec, tiny_unet(3)).eval()
    moved = copy.deepcopy(spec)
    moved.source = str(save_tiny_model(tmp_path, "llama", hidden_size=96))
    monkeypatch.setattr("nnunetv2_llm.model.frozen_stack.read_layer_state_dict",
                        lambda *a, **k: pytest.fail("the source was read"))
    rebuilt = build_llm_unet(moved, tiny_unet(3), from_checkpoint=True).eval()
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(rebuilt(x)[0], trained(x)[0])


def test_a_build_that_leaves_the_read_layer_untaken_fails(spec):
    """Training must never run with other frozen weights than the ones read and checksummed."""
    from nnunetv2_llm.model.network import reuse_layer

    with pytest.raises(RuntimeError, match="did not take the frozen layer"):
        with reuse_layer(spec, {"weight": torch.zeros(1)}):
            pass


def test_block_keeps_input_dtype_and_runs_layer_outside_autocast(spec):
    """Under bf16 autocast the projections and the layer still compute in float32 (the layer's dtype)."""
    from nnunetv2_llm.model.network import build_mixer

    block = LLMBottleneckBlock(32, 64, 4, build_mixer(spec))
    seen = []
    for module in (block.proj_in, block.mixer, block.proj_out):
        module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.randn(2, 32, 2, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert seen == [(torch.float32, torch.float32)] * 3
