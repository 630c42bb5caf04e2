"""Shared plumbing: user-facing errors, atomic files, dataset checks, nnU-Net's commands and environment."""
