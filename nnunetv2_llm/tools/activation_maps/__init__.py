"""Bottleneck activations before and after the LLM block: ``compute`` captures them on one case with the model
nnU-Net loads, ``figure`` draws them, ``cli`` is the ``nnunetv2_llm activation-maps`` command."""
