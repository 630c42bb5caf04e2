"""nnunetv2-llm: a frozen pre-trained LLM transformer layer at the bottleneck of nnU-Net v2."""

__version__ = "0.1.0"
