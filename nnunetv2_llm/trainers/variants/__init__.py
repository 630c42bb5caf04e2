"""Variants of ``nnUNetTrainerLLM``, grouped by concern as nnU-Net's own ``variants/``: ``controls`` (no LLM, a
random layer), ``adapters`` (LoRA), ``precision`` (bfloat16), ``budgets`` (training length and data fraction of
every trainer, generated)."""
