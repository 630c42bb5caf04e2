"""The frozen layer stored and run in another dtype than its source's."""

from __future__ import annotations

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMRandom


class nnUNetTrainerLLM_bf16(nnUNetTrainerLLM):
    """The frozen pre-trained layer stored and run in bfloat16 whatever its source's dtype: half the bytes, and
    faster products on hardware with bf16 units. A float32 or de-quantised GGUF layer is rounded to bfloat16 (the
    dtype most LLMs are published in); compare it with ``nnUNetTrainerLLMRandom_bf16``."""

    llm_dtype = "bfloat16"


class nnUNetTrainerLLMRandom_bf16(nnUNetTrainerLLMRandom):
    """Control for ``nnUNetTrainerLLM_bf16``: the random frozen layer, in bfloat16."""

    llm_dtype = "bfloat16"
