"""Command-line tools around nnU-Net: benchmark, activation maps, guarded predict, data conversion, demo, info."""
