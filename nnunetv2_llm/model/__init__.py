"""The network: the bottleneck block, the frozen LLM layer, the wrapper around nnU-Net's U-Net, the spec in plans."""
