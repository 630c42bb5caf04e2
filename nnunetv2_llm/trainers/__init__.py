"""The trainer family nnU-Net's lookup finds (through ``nnunetv2_llm/trainers/lookup``, see
``nnunetv2_llm info --exports``): ``nnUNetTrainerLLM``, its variants and their budget variants."""

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.variants.adapters import nnUNetTrainerLLM_LoRA
from nnunetv2_llm.trainers.variants.budgets import VARIANTS
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom
from nnunetv2_llm.trainers.variants.precision import nnUNetTrainerLLM_bf16, nnUNetTrainerLLMRandom_bf16

globals().update(VARIANTS)
__all__ = ["nnUNetTrainerLLM", "nnUNetTrainerLLM_LoRA", "nnUNetTrainerLLMNoLLM", "nnUNetTrainerLLMRandom",
           "nnUNetTrainerLLM_bf16", "nnUNetTrainerLLMRandom_bf16", *sorted(VARIANTS)]
