"""Normalised surface Dice (NSD) at a tolerance in mm (MONAI's ``compute_surface_dice``).

The surfaces are the boundary voxels of each mask (the mask minus its binary erosion), with exact Euclidean
nearest-boundary distances in mm from the voxel spacing: the fraction of boundary voxels of both masks that lie
within the tolerance of the other mask's boundary (the MetricsReloaded counting, not DeepMind's surface elements).
"""

from collections.abc import Sequence

import numpy as np
from monai.metrics import compute_surface_dice

from nnunetv2_llm.evaluation.metrics.monai_input import as_monai_batch, monai_warnings_silenced


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """NSD of two non-empty boolean masks.

    Args:
        pred: predicted mask, shape ``(d0, d1[, d2])``.
        ref: reference mask, same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order.
        tolerance_mm: boundary distances up to this many mm count as agreement.

    Returns:
        NSD in [0, 1].
    """
    with monai_warnings_silenced():
        value = compute_surface_dice(as_monai_batch(pred), as_monai_batch(ref), [float(tolerance_mm)],
                                     include_background=True, spacing=spacing)
    return float(value)
