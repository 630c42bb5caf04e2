"""The ablations as trainers: stacked layer ranges, full-rank projections, the unfrozen layer, seed variants."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from torch import nn

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import FIXTURE, nnunet_command, run, trainer_fold_dir
from nnunetv2_llm.common.trainer_names import seeded_name, split_seed
from nnunetv2_llm.llm.layer_range import parse_layers
from nnunetv2_llm.model.frozen_stack import FrozenLLMStack
from nnunetv2_llm.model.network import build_llm_unet, build_mixer, reuse_layer
from nnunetv2_llm.model.spec import (
    FROZEN_PREFIX,
    PLANS_KEY,
    BottleneckSpec,
    LLMChoice,
    frozen_layer_differs,
    frozen_layer_sha256,
    make_spec_and_layer,
)
from nnunetv2_llm.trainers.variants.unfrozen import LAYER_LR_SCALE


@pytest.mark.parametrize("value,expected", [("20:24", range(20, 24)), ("-4:", range(26, 30)), (":2", range(0, 2)),
                                            ("5", range(5, 6)), (-1, range(29, 30)), ("-3:-1", range(27, 29)),
                                            ("0:30", range(0, 30))])
def test_layer_ranges_are_python_half_open_slices(value, expected):
    assert parse_layers(value, 30) == expected


@pytest.mark.parametrize("value,message", [("30", "out of range"), ("0:31", "outside the model"),
                                           ("5:5", "selects no layer"), ("24:20", "selects no layer"),
                                           ("a:b", "neither an integer"), ("1.5", "neither an integer")])
def test_bad_layer_ranges_name_the_setting(value, message):
    with pytest.raises(LLMSettingError, match=message) as error:
        parse_layers(value, 30)
    assert error.value.setting == "nnUNet_LLM_LAYER"


def _tokens() -> torch.Tensor:
    return torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))


def test_a_stack_runs_its_layers_in_order_and_is_checksummed_together(three_layer_llama):
    spec, state = make_spec_and_layer(LLMChoice("pretrained", source=three_layer_llama, layer="1:3"))
    assert (spec.layer, spec.num_layers, spec.layer_label, list(spec.layers)) == (1, 2, "1:3", [1, 2])
    with reuse_layer(spec, state):
        stack = build_mixer(spec)
    assert isinstance(stack, FrozenLLMStack)
    assert frozen_layer_sha256(stack.state_dict(), spec.dtype, prefix="layer.") == spec.layer_sha256
    singles = [build_mixer(make_spec_and_layer(LLMChoice("pretrained", source=three_layer_llama, layer=k))[0])
               for k in (1, 2)]
    x = _tokens()
    with torch.no_grad():
        assert torch.allclose(stack(x), singles[1](singles[0](x)), atol=1e-6)
        assert not torch.allclose(stack(x), singles[1](x), atol=1e-3)
    assert not any(p.requires_grad for p in stack.parameters())


def test_a_random_stack_gets_distinct_layers_and_a_checkpoint_restores_it(three_layer_llama):
    spec, _ = make_spec_and_layer(LLMChoice("random", source=three_layer_llama, layer="0:2"))
    stack = build_mixer(spec)
    first, second = (dict(m.layer.named_parameters()) for m in stack.layer)
    assert not torch.equal(first["self_attn.q_proj.weight"], second["self_attn.q_proj.weight"])
    single = build_mixer(make_spec_and_layer(LLMChoice("random", source=three_layer_llama, layer=0))[0])
    assert torch.equal(first["self_attn.q_proj.weight"], single.layer.self_attn.q_proj.weight)  # position 0: seed


def test_full_rank_projections_start_as_the_identity_block(three_layer_llama):
    spec, _ = make_spec_and_layer(LLMChoice("identity", source=three_layer_llama, rank=0))
    unet = nn.Module()
    unet.encoder, unet.decoder = nn.Module(), nn.Identity()
    unet.encoder.output_channels = [8, 32]
    block = build_llm_unet(spec, unet).bottleneck
    assert isinstance(block.proj_in, nn.Linear) and isinstance(block.proj_out, nn.Linear)
    assert block.proj_in.weight.shape == (64, 32) and block.proj_out.weight.shape == (32, 64)
    x = torch.randn(2, 32, 3, 4, 5)
    assert torch.equal(block(x), x)


def test_an_unfrozen_layer_trains_in_its_own_group_and_skips_the_frozen_checksum(three_layer_llama):
    from nnunetv2_llm.trainers.schedule import GroupPolyLRScheduler

    spec, state = make_spec_and_layer(LLMChoice("pretrained", source=three_layer_llama, layer=2, train_layer=True))
    with reuse_layer(spec, state):
        mixer = build_mixer(spec)
    assert all(p.requires_grad for p in mixer.parameters())
    with torch.no_grad():
        mixer.layer.mlp.up_proj.weight.add_(1.0)  # what training does to it
    network_state = {FROZEN_PREFIX + k: v for k, v in mixer.layer.state_dict().items()}
    assert frozen_layer_differs(network_state, spec) is None
    frozen = BottleneckSpec(**{**spec.__dict__, "train_layer": False})
    assert frozen_layer_differs(network_state, frozen) is not None

    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.01}], 0.01)
    scheduler = GroupPolyLRScheduler(optimizer, 0.01, 10)
    scheduler.step(5)
    expected = 0.01 * (1 - 5 / 10) ** 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected * 0.01])


def test_seed_names_round_trip():
    assert seeded_name("nnUNetTrainerLLM_10epochs_25iters", 2) == "nnUNetTrainerLLM_10epochs_25iters_seed2"
    assert split_seed("nnUNetTrainerLLM_10epochs_25iters_seed2") == ("nnUNetTrainerLLM_10epochs_25iters", 2)
    assert split_seed("nnUNetTrainerLLM") == ("nnUNetTrainerLLM", None)
    assert split_seed("nnUNetTrainerLLM_seed02") == ("nnUNetTrainerLLM_seed02", None)


def test_seed_variants_are_found_by_nnunet_lookup(nnunet_workdir):
    names = ["nnUNetTrainerLLM_seed1", "nnUNetTrainerLLMRandom_1epoch_2iters_seed2", "nnUNetTrainer_seed0",
             "nnUNetTrainer_5epochs_seed3", "nnUNetTrainerLLMUnfrozen_frac10_seed4", "nnUNetTrainerLLM_FullRank_seed5"]
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "from nnunetv2_llm.trainers.reliability import ReliabilityMixin\n"
            f"for n in {names!r}:\n"
            "    c = f(n); print('FOUND', c.__name__, c.llm_seed, issubclass(c, ReliabilityMixin))\n"
            "try:\n    f('nnUNetTrainerNoSuch_seed1')\nexcept RuntimeError:\n    print('REFUSED')")
    result = subprocess.run([nnunet_command("python"), "-c", code], env={**os.environ, **nnunet_workdir},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("FOUND ")]
    assert found == [[n, str(split_seed(n)[1]), "True"] for n in names]
    assert "REFUSED" in result.stdout


def test_stacked_unfrozen_full_rank_seeded_training_predicts_without_the_source(nnunet_workdir, three_layer_llama,
                                                                               tmp_path):
    """As a user: nnUNetv2_train with a layer range on a tiny checkpoint, then nnUNetv2_predict without it."""
    trainer = "nnUNetTrainerLLMUnfrozen_1epoch_2iters_seed1"
    env = {**nnunet_workdir, "nnUNet_LLM_SOURCE": str(three_layer_llama), "nnUNet_LLM_LAYER": "-2:",
           "nnUNet_results": str(tmp_path / "results")}
    run(["nnUNetv2_train", "4", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = trainer_fold_dir(env, 4, "3d_fullres", trainer, "0")
    spec = BottleneckSpec(**json.loads((fold.parent / "plans.json").read_text())[PLANS_KEY])
    assert (spec.layer, spec.num_layers, spec.train_layer, spec.seed) == (1, 2, True, 1)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    groups = checkpoint["optimizer_state"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, LAYER_LR_SCALE]
    # the layers' group holds both layers' tensors and they received gradients (two steps move them by less than
    # float32 resolves: the zero-initialised output projection passes no gradient at step 0)
    n_layer_tensors = sum(k.startswith(FROZEN_PREFIX) for k in checkpoint["network_weights"])
    assert len(groups[1]["params"]) == n_layer_tensors == 2 * 9
    momentum = [checkpoint["optimizer_state"]["state"][i]["momentum_buffer"] for i in groups[1]["params"]]
    assert any(bool(m.abs().sum() > 0) for m in momentum)
    images = tmp_path / "images"
    images.mkdir()
    src = sorted((FIXTURE / "imagesTr").glob("*.nii.gz"))[0]
    (images / "case_0000.nii.gz").write_bytes(src.read_bytes())
    no_source = {k: v for k, v in env.items() if k not in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER")}
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", "4", "-c", "3d_fullres",
         "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], no_source)
    assert (tmp_path / "pred" / "case.nii.gz").is_file()


def test_an_unfrozen_layer_gets_finite_gradients_under_fp16_autocast(three_layer_llama):
    """nnU-Net trains under fp16 autocast on CUDA; the block runs its layer in float32 with autocast off, so large
    half-precision features give finite float32 gradients in the layer (CPU autocast runs the same code path)."""
    from nnunetv2_llm.model.block import LLMBottleneckBlock

    spec, state = make_spec_and_layer(LLMChoice("pretrained", source=three_layer_llama, layer=2, train_layer=True))
    with reuse_layer(spec, state):
        block = LLMBottleneckBlock(32, spec.width, 8, build_mixer(spec))
    nn.init.normal_(block.proj_out.up.weight)  # as after some training: the layer's gradient is not zero
    x = (torch.randn(2, 32, 3, 4, 5).clamp(-6, 6) * 1e4).half()  # large, yet finite in float16
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x)
    out.float().square().mean().backward()
    grads = [p.grad for p in block.mixer.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
