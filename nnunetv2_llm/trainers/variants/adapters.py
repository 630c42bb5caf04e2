"""The maps around the frozen layer: LoRA adapters on it, and full-rank projections into and out of it."""

from __future__ import annotations

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMNoLLM, nnUNetTrainerLLMRandom


class nnUNetTrainerLLM_LoRA(nnUNetTrainerLLM):
    """The frozen pre-trained layer with trainable peft LoRA adapters (rank 8) on its linear layers."""

    llm_lora_rank = 8


class nnUNetTrainerLLM_FullRank(nnUNetTrainerLLM):
    """Full ``nn.Linear`` projections into and out of the layer (as LLM4Seg and Pang et al.) instead of the default
    rank-64 factorised ones; compare with ``nnUNetTrainerLLMNoLLM_FullRank`` and ``nnUNetTrainerLLMRandom_FullRank``."""

    llm_rank = 0


class nnUNetTrainerLLMNoLLM_FullRank(nnUNetTrainerLLMNoLLM):
    """Control for ``nnUNetTrainerLLM_FullRank``: the full-rank projections around the identity."""

    llm_rank = 0


class nnUNetTrainerLLMRandom_FullRank(nnUNetTrainerLLMRandom):
    """Control for ``nnUNetTrainerLLM_FullRank``: the full-rank projections around the frozen random layer."""

    llm_rank = 0
