"""One reader per weights format; each returns one layer's tensors, keys relative to the layer."""
