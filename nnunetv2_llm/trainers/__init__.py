"""The trainer family nnU-Net's lookup finds (through ``nnunetv2_llm/trainers/lookup``, see
``nnunetv2_llm info --exports``): ``nnUNetTrainerLLM``, its variants, their budget variants, and the seed variants
``{trainer}_seed{K}`` of all of them, made on request (module ``__getattr__``)."""

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.variants.adapters import (
    nnUNetTrainerLLM_FullRank,
    nnUNetTrainerLLM_LoRA,
    nnUNetTrainerLLMNoLLM_FullRank,
    nnUNetTrainerLLMRandom_FullRank,
)
from nnunetv2_llm.trainers.variants.budgets import VARIANTS
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom
from nnunetv2_llm.trainers.variants.precision import nnUNetTrainerLLM_bf16, nnUNetTrainerLLMRandom_bf16
from nnunetv2_llm.trainers.variants.seeds import seeded_trainer
from nnunetv2_llm.trainers.variants.unfrozen import nnUNetTrainerLLMRandomUnfrozen, nnUNetTrainerLLMUnfrozen

globals().update(VARIANTS)
__all__ = ["nnUNetTrainerLLM", "nnUNetTrainerLLM_LoRA", "nnUNetTrainerLLMNoLLM", "nnUNetTrainerLLMRandom",
           "nnUNetTrainerLLM_bf16", "nnUNetTrainerLLMRandom_bf16", "nnUNetTrainerLLM_FullRank",
           "nnUNetTrainerLLMNoLLM_FullRank", "nnUNetTrainerLLMRandom_FullRank", "nnUNetTrainerLLMUnfrozen",
           "nnUNetTrainerLLMRandomUnfrozen", *sorted(VARIANTS)]


def __getattr__(name: str) -> type:
    """A seed variant ``{trainer}_seed{K}``, made and kept on first request (nnU-Net's lookup asks by ``hasattr``)."""
    made = seeded_trainer(name, globals(), __name__)
    if made is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = made
    return made
