"""Training-budget and data-fraction variants of every trainer, named like nnU-Net's own (``nnUNetTrainer_5epochs``).

Names: ``{trainer}[_frac{P}][_{E}epochs][_{I}iters]`` (``_1epoch`` for one). ``_{I}iters`` sets the iterations per
epoch (nnU-Net: 250) and the validation iterations to a fifth of that (nnU-Net: 50). Only the budgets people use
are generated, the same for each trainer in ``FAMILIES`` (``nnUNetTrainer``, ``nnUNetTrainerLLM``, its controls
``NoLLM`` and ``Random``, ``_LoRA``, ``_bf16``, ``Random_bf16``, the ``_FullRank`` three and the two ``Unfrozen``), so
that every comparison has its pair (seed variants of all of them: ``variants.seeds``):

- nnU-Net-length epochs: ``_{E}epochs`` for E in 1, 2, 3, 5, 10, 20, 50, 100 (250 iterations each);
- the same with nnU-Net's iteration count spelled out, ``_{E}epochs_250iters``, for each E that nnU-Net ships as
  ``nnUNetTrainer_{E}epochs`` (1, 5, 10, 20, 50, 100): nnU-Net's lookup finds its own ``nnUNetTrainer_{E}epochs``
  first, which lacks ``ReliabilityMixin``, so ``nnUNetTrainer_20epochs_250iters`` against
  ``nnUNetTrainerLLM_20epochs_250iters`` is the comparison on equal terms;
- short budgets: ``_1epoch_2iters``, ``_2epochs_2iters``, ``_3epochs_2iters`` (smoke tests), ``_5epochs_25iters``,
  ``_10epochs_25iters`` (CPU runs, the demo), ``_20epochs_50iters`` (a short GPU head-to-head);
- data fractions (MedVisionLlama's 10% and 30% experiments): ``_frac10`` and ``_frac30``, alone or followed by an
  nnU-Net-length epoch budget (``_frac10_50epochs``).

Every variant defined here (the baseline's ``nnUNetTrainer_2epochs`` too) carries ``ReliabilityMixin``; nnU-Net's
own ``nnUNetTrainer_1epoch``, ``_5epochs``, ... are not redefined and lack it.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs as nnunet_epoch_variants

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.reliability import ReliabilityMixin
from nnunetv2_llm.trainers.variants.adapters import (
    nnUNetTrainerLLM_FullRank,
    nnUNetTrainerLLM_LoRA,
    nnUNetTrainerLLMNoLLM_FullRank,
    nnUNetTrainerLLMRandom_FullRank,
)
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom
from nnunetv2_llm.trainers.variants.precision import nnUNetTrainerLLM_bf16, nnUNetTrainerLLMRandom_bf16
from nnunetv2_llm.trainers.variants.unfrozen import nnUNetTrainerLLMRandomUnfrozen, nnUNetTrainerLLMUnfrozen

FAMILIES = (nnUNetTrainer, nnUNetTrainerLLM, nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom, nnUNetTrainerLLM_LoRA,
            nnUNetTrainerLLM_bf16, nnUNetTrainerLLMRandom_bf16, nnUNetTrainerLLM_FullRank,
            nnUNetTrainerLLMNoLLM_FullRank, nnUNetTrainerLLMRandom_FullRank, nnUNetTrainerLLMUnfrozen,
            nnUNetTrainerLLMRandomUnfrozen)
EPOCHS = (1, 2, 3, 5, 10, 20, 50, 100)  # at nnU-Net's iterations per epoch
NNUNET_ITERATIONS = 250
SHORT_BUDGETS = ((1, 2), (2, 2), (3, 2), (5, 25), (10, 25), (20, 50))  # (epochs, iterations per epoch)
FRACTIONS = (10, 30)  # percent of each fold's training cases
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
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
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
    """``{base}[_frac{P}][_{E}epochs][_{I}iters]``, as nnU-Net names its own (``_1epoch`` for one)."""
    parts = [base]
    if percent is not None:
        parts.append(f"frac{percent}")
    if epochs is not None:
        parts.append("1epoch" if epochs == 1 else f"{epochs}epochs")
    if iterations is not None:
        parts.append(f"{iterations}iters")
    return "_".join(parts)


def nnunet_ships(name: str) -> bool:
    """Whether nnU-Net defines a trainer of this name itself (``nnUNetTrainer_5epochs``); its lookup finds it first."""
    return hasattr(nnunet_epoch_variants, name)


def budgets() -> list[tuple[int | None, int | None, int | None]]:
    """(percent, epochs, iterations) of every generated variant, by the rule in the module docstring."""
    made = [(None, epochs, None) for epochs in EPOCHS]
    made += [(None, epochs, NNUNET_ITERATIONS) for epochs in EPOCHS
             if nnunet_ships(variant_name(nnUNetTrainer.__name__, None, epochs, None))]
    made += [(None, epochs, iterations) for epochs, iterations in SHORT_BUDGETS]
    made += [(percent, epochs, None) for percent in FRACTIONS for epochs in (None, *EPOCHS)]
    return made


def make_variants() -> dict[str, type]:
    """Name -> class for every family and budget, except the names nnU-Net ships itself."""
    made = {}
    for family in FAMILIES:
        # The baseline's variants get the same checkpointing, resume checks and NaN guard.
        bases = ((ExperimentVariantMixin, family) if issubclass(family, ReliabilityMixin)
                 else (ExperimentVariantMixin, ReliabilityMixin, family))
        for percent, epochs, iterations in budgets():
            name = variant_name(family.__name__, percent, epochs, iterations)
            if nnunet_ships(name):
                continue
            made[name] = type(name, bases, {
                "__module__": __name__, "__qualname__": name, "variant_epochs": epochs,
                "variant_iterations": iterations, "variant_percent": percent,
                "__doc__": f"{family.__name__} with {name[len(family.__name__) + 1:]}.",
            })
    return made


VARIANTS = make_variants()
globals().update(VARIANTS)
__all__ = sorted(VARIANTS)
