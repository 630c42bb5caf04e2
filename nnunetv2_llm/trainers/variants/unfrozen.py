"""The LLM layer trained with the rest of the network (LLM4Seg's "(T)" rows) instead of frozen."""

from __future__ import annotations

from nnunetv2_llm.trainers.llm_trainer import nnUNetTrainerLLM
from nnunetv2_llm.trainers.variants.controls import nnUNetTrainerLLMRandom

# The layer's SGD rate relative to nnU-Net's 0.01 (same momentum 0.99 and poly decay): a pre-trained layer should move
# less than freshly initialised convolutions; the probe behind it is in BENCHMARKS.md ("Unfrozen layer: learning rate").
LAYER_LR_SCALE = 0.1


class nnUNetTrainerLLMUnfrozen(nnUNetTrainerLLM):
    """The pre-trained layer trains with the network, in its own optimizer parameter group at ``LAYER_LR_SCALE`` x
    nnU-Net's learning rate, stored and run in float32 (bfloat16 weights would lose most SGD updates)."""

    llm_train_layer = True
    llm_layer_lr_scale = LAYER_LR_SCALE
    llm_dtype = "float32"


class nnUNetTrainerLLMRandomUnfrozen(nnUNetTrainerLLMRandom):
    """Control for ``nnUNetTrainerLLMUnfrozen``: the same architecture from a random start, trained the same way,
    so that what pre-training adds to a trained layer can be told apart from what the layer's capacity adds."""

    llm_train_layer = True
    llm_layer_lr_scale = LAYER_LR_SCALE
    llm_dtype = "float32"
