"""``nnUNet_LLM_SEED=S``: Python, NumPy and torch seeded before the network is built and before the data loaders
start (on resume with ``S + epoch``).

With ``nnUNet_n_proc_DA=0`` (augmentation in the main process) two CPU runs on the same machine give the same
losses. On CUDA nnU-Net turns on ``cudnn.benchmark`` (non-deterministic algorithms) and torch.compile, so GPU runs
are seeded but not bit-reproducible. Unset, nnU-Net's default (unseeded) behaviour is kept.
"""

from __future__ import annotations

import random

import numpy as np
import torch

ENV_SEED = "nnUNet_LLM_SEED"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class SeedingMixin:
    """Seeds with ``llm_seed`` (None: unseeded) when the network is built and when training (re)starts."""

    llm_seed: int | None = None

    def initialize(self) -> None:
        if self.llm_seed is not None and not self.was_initialized:
            seed_everything(self.llm_seed)
        return super().initialize()

    def on_train_start(self) -> None:
        if self.llm_seed is not None:
            if not self.was_initialized:
                self.initialize()
            seed_everything(self.llm_seed + self.current_epoch)
            self.print_to_log_file(f"nnunetv2_llm: seeded with {self.llm_seed} + epoch {self.current_epoch}")
        super().on_train_start()
