"""The controls that make an LLM trainer's result interpretable: the same block without the LLM, and with a frozen
random layer of the same architecture."""

from __future__ import annotations

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM


class nnUNetTrainerLLMNoLLM(nnUNetTrainerLLM):
    """Control: the same wrapper and projections, the LLM layer replaced by the identity."""

    llm_mixer = "identity"


class nnUNetTrainerLLMRandom(nnUNetTrainerLLM):
    """Control: the same layer architecture, randomly initialised (fixed seed) and frozen."""

    llm_mixer = "random"
