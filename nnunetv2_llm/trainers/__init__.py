"""Trainer classes found by nnU-Net's lookup through the repo's ``trainers/`` folder (``nnUNet_extTrainer``)."""

from nnunetv2_llm.trainers.llm_trainer import (
    nnUNetTrainerLLM, nnUNetTrainerLLM_LoRA, nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom,
)
from nnunetv2_llm.trainers.variants import VARIANTS

globals().update(VARIANTS)
__all__ = ["nnUNetTrainerLLM", "nnUNetTrainerLLM_LoRA", "nnUNetTrainerLLMNoLLM", "nnUNetTrainerLLMRandom",
           *sorted(VARIANTS)]
