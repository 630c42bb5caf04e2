"""Trainable adapters on the frozen layer."""

from __future__ import annotations

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM


class nnUNetTrainerLLM_LoRA(nnUNetTrainerLLM):
    """The frozen pre-trained layer with trainable peft LoRA adapters (rank 8) on its linear layers."""

    llm_lora_rank = 8
