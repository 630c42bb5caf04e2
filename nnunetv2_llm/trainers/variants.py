"""Budget and data-fraction variants of every trainer, named like nnU-Net's own (``nnUNetTrainer_5epochs``).

Names: ``{trainer}[_frac{P}][_{E}epochs][_{I}iters]``, e.g. ``nnUNetTrainerLLM_frac10_50epochs`` or
``nnUNetTrainerLLM_5epochs_25iters``. ``_Xiters`` sets iterations per epoch (nnU-Net: 250) and validation
iterations to a fifth of that (nnU-Net: 50); ``_250iters`` is nnU-Net's own count. The variants defined here
(the baseline's ``nnUNetTrainer_2epochs`` and ``nnUNetTrainer_20epochs_250iters`` too) carry ``ReliabilityMixin``
(checkpoint every epoch, atomic writes, checked resume, NaN guard, ``nnUNet_LLM_SEED``). nnU-Net's own
``nnUNetTrainer_1epoch``, ``_5epochs``, ``_10epochs``, ``_20epochs`` ... are not redefined (nnU-Net's lookup
finds its own first) and lack it: for a comparison on equal terms use ``nnUNetTrainer_20epochs_250iters``
against ``nnUNetTrainerLLM_20epochs_250iters``.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs as nnunet_epoch_variants

from nnunetv2_llm.trainers.llm_trainer import (
    nnUNetTrainerLLM, nnUNetTrainerLLM_bf16, nnUNetTrainerLLM_LoRA, nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom,
    nnUNetTrainerLLMRandom_bf16,
)
from nnunetv2_llm.trainers.reliability import ReliabilityMixin

FAMILIES = (nnUNetTrainer, nnUNetTrainerLLM, nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom, nnUNetTrainerLLM_LoRA,
            nnUNetTrainerLLM_bf16, nnUNetTrainerLLMRandom_bf16)
FRACTIONS = (None, 10, 30)
EPOCHS = (None, 1, 2, 3, 5, 10, 20, 50, 100)
ITERATIONS = (None, 2, 10, 25, 50, 250)
SPLIT_SEED = 12345  # nnU-Net's own split seed


def subsample_training_cases(keys: list[str], percent: int, fold: int | str) -> list[str]:
    """Deterministic subset of a fold's training cases, the same for every trainer: sorted keys, seeded by fold."""
    keys = sorted(keys)
    n = max(1, round(len(keys) * percent / 100))
    seed = SPLIT_SEED + (fold if isinstance(fold, int) else 0)
    chosen = np.random.RandomState(seed).choice(len(keys), n, replace=False)
    return [keys[i] for i in sorted(chosen)]


class ExperimentVariantMixin:
    """Applies a training budget and a training-data fraction to whatever trainer it is mixed into."""

    variant_epochs: int | None = None
    variant_iterations: int | None = None
    variant_percent: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.variant_epochs is not None:
            self.num_epochs = self.variant_epochs
        if self.variant_iterations is not None:
            self.num_iterations_per_epoch = self.variant_iterations
            self.num_val_iterations_per_epoch = max(1, self.variant_iterations // 5)

    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split, with the training cases subsampled; the validation cases stay untouched."""
        tr_keys, val_keys = super().do_split()
        if self.variant_percent is not None:
            tr_keys = subsample_training_cases(tr_keys, self.variant_percent, self.fold)
            self.print_to_log_file(f"Training on {self.variant_percent}% of the fold: {len(tr_keys)} cases.")
        return tr_keys, val_keys


def variant_name(base: str, percent: int | None, epochs: int | None, iterations: int | None) -> str:
    parts = [base]
    if percent is not None:
        parts.append(f"frac{percent}")
    if epochs is not None:
        parts.append("1epoch" if epochs == 1 else f"{epochs}epochs")
    if iterations is not None:
        parts.append(f"{iterations}iters")
    return "_".join(parts)


def _make_variants() -> dict[str, type]:
    made = {}
    for family in FAMILIES:
        for percent in FRACTIONS:
            for epochs in EPOCHS:
                for iterations in ITERATIONS:
                    if percent is epochs is iterations is None:
                        continue
                    name = variant_name(family.__name__, percent, epochs, iterations)
                    if hasattr(nnunet_epoch_variants, name):
                        continue  # nnU-Net ships it (nnUNetTrainer_5epochs, ...), and its lookup finds nnU-Net's first
                    # The baseline's variants get the same checkpointing, resume checks and NaN guard.
                    bases = ((ExperimentVariantMixin, family) if issubclass(family, ReliabilityMixin)
                             else (ExperimentVariantMixin, ReliabilityMixin, family))
                    made[name] = type(name, bases, {
                        "__module__": __name__, "__qualname__": name, "variant_epochs": epochs,
                        "variant_iterations": iterations, "variant_percent": percent,
                        "__doc__": f"{family.__name__} with {name[len(family.__name__) + 1:]}.",
                    })
    return made


VARIANTS = _make_variants()
globals().update(VARIANTS)
__all__ = sorted(VARIANTS)
