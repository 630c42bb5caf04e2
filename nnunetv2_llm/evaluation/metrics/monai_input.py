"""Masks in the form MONAI's metric functions take them."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def as_monai_batch(mask: np.ndarray) -> torch.Tensor:
    """A boolean mask of shape ``(*spatial)`` as a float32 tensor of shape ``(1, 1, *spatial)`` (batch, channel)."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


@contextmanager
def monai_warnings_silenced() -> Iterator[None]:
    """MONAI 1.5+ warns about its own internal use of a deprecated argument on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        yield
