"""Same seed, same CPU, same data: the same first-epoch loss, with the real ``nnUNetv2_train``.

A seed variant ``{trainer}_seed{K}`` and ``nnUNet_LLM_SEED=K`` seed the same way: Python, NumPy and torch before the
network is built and before the data loaders start;
``nnUNet_n_proc_DA=0`` keeps augmentation in the main process (nnU-Net's worker processes are not seeded). Each
run is stopped once epoch 0's checkpoint is written; the exact float32 loss is read from it.

Documented tolerance: on the same machine, thread count and library versions the loss is expected to be
bit-identical; the test allows a relative difference of 1e-6 (float32 rounding, if a BLAS picks a different
reduction order). A different seed must change the loss, so the check can fail. GPU runs are not covered: nnU-Net
turns on cudnn.benchmark, which picks kernels by timing.
"""

from __future__ import annotations

import signal

import pytest
from reliability_helpers import fold_dir, train, train_env

from nnunetv2_llm.common.trainer_names import seeded_name
from nnunetv2_llm.trainers.reliability.checkpoint_io import load_checkpoint_file

TRAINER = "nnUNetTrainerLLM_2epochs_2iters"
RELATIVE_TOLERANCE = 1e-6


def first_epoch_loss(workdir, tiny_llama, results, seed: str, variant: bool = False) -> float:
    """Epoch 0's loss of ``TRAINER`` seeded with ``seed``: by ``nnUNet_LLM_SEED``, or (``variant``) as the seed
    variant ``TRAINER_seed{seed}``."""
    trainer = seeded_name(TRAINER, int(seed)) if variant else TRAINER
    env = train_env(workdir, results, tiny_llama, layer="1", **({} if variant else {"nnUNet_LLM_SEED": seed}))
    run = train(trainer, env, kill_when=r": Epoch 1\s*$", sig=signal.SIGTERM)
    assert run.killed, run.output[-3000:]
    assert f"seeded with {seed} + epoch 0" in run.output
    checkpoint = load_checkpoint_file(fold_dir(env, trainer) / "checkpoint_latest.pth")
    assert checkpoint["current_epoch"] == 1
    return float(checkpoint["logging"]["train_losses"][0])


def test_same_seed_same_first_epoch_loss(workdir, tiny_llama, tmp_path):
    a = first_epoch_loss(workdir, tiny_llama, tmp_path / "a", "1234")
    b = first_epoch_loss(workdir, tiny_llama, tmp_path / "b", "1234", variant=True)
    c = first_epoch_loss(workdir, tiny_llama, tmp_path / "c", "4321")
    print(f"first-epoch loss: seed 1234 {a!r} and (seed variant) {b!r} (difference {abs(a - b):.3g}), seed 4321 {c!r}")
    assert a == pytest.approx(b, rel=RELATIVE_TOLERANCE, abs=0)
    assert abs(a - c) > 1e-4  # the seed matters: the check can fail
