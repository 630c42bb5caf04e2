"""Trainer classes found by nnU-Net's lookup through the repo's ``trainers/`` folder (``nnUNet_extTrainer``)."""

from nnunetv2_llm.trainers.llm_trainer import (
    nnUNetTrainerLLM, nnUNetTrainerLLM_bf16, nnUNetTrainerLLM_LoRA, nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom,
    nnUNetTrainerLLMRandom_bf16,
)
from nnunetv2_llm.trainers.variants import VARIANTS

globals().update(VARIANTS)
__all__ = ["nnUNetTrainerLLM", "nnUNetTrainerLLM_LoRA", "nnUNetTrainerLLMNoLLM", "nnUNetTrainerLLMRandom",
           "nnUNetTrainerLLM_bf16", "nnUNetTrainerLLMRandom_bf16", *sorted(VARIANTS)]
