"""``ReliabilityMixin``: the reliability parts composed into one mixin for nnU-Net trainers."""

from __future__ import annotations

import os

import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.trainers.reliability.checkpoints import ENV_SAVE_EVERY, CheckpointMixin
from nnunetv2_llm.trainers.reliability.nan_guard import ENV_MAX_NONFINITE, NanGuardMixin
from nnunetv2_llm.trainers.reliability.seeding import ENV_SEED, SeedingMixin
from nnunetv2_llm.trainers.reliability.signals import SignalMixin


def env_int(name: str, default: int | None, minimum: int = 0) -> int | None:
    """The integer in environment variable ``name`` (``default`` when unset or empty); LLMSettingError otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise LLMSettingError(f"{name}='{value}' is not an integer", name) from None
    if number < minimum:
        raise LLMSettingError(f"{name}={number} must be at least {minimum}", name)
    return number


class ReliabilityMixin(CheckpointMixin, SeedingMixin, SignalMixin, NanGuardMixin):
    """Put in front of ``nnUNetTrainer`` (or any subclass) in a trainer's bases; see the package docstring. Works
    for any nnU-Net trainer (the frozen-layer checks apply when the trainer has an ``llm_spec``).

    At training start the parts run in this order: stale temporaries and an earlier final checkpoint
    (checkpoints), seeding, the SIGTERM handler, then nnU-Net's own ``on_train_start`` with atomic json writes."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            self.save_every = env_int(ENV_SAVE_EVERY, 1, minimum=1)
            self.max_nonfinite_steps = env_int(ENV_MAX_NONFINITE, 3, minimum=1)
            if self.llm_seed is None:  # a seed variant's own seed wins (its model folder is named by it)
                self.llm_seed = env_int(ENV_SEED, None)
        except LLMSettingError as e:
            self._exit_with(f"error: {e}", 2)
