"""Where the frozen layer comes from: resolving a source, reading its config and one layer's tensors."""
