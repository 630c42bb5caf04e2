"""95th-percentile Hausdorff distance (HD95) in mm (MONAI's ``compute_hausdorff_distance``), over the boundary
voxels of both masks with exact Euclidean distances from the voxel spacing."""

from collections.abc import Sequence

import numpy as np
from monai.metrics import compute_hausdorff_distance

from nnunetv2_llm.evaluation.metrics.monai_input import as_monai_batch, monai_warnings_silenced


def hausdorff95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 of two non-empty boolean masks.

    Args:
        pred: predicted mask, shape ``(d0, d1[, d2])``.
        ref: reference mask, same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order.

    Returns:
        The 95th percentile of the boundary-to-boundary distances in both directions, in mm.
    """
    with monai_warnings_silenced():
        value = compute_hausdorff_distance(as_monai_batch(pred), as_monai_batch(ref), include_background=True,
                                           percentile=95, spacing=spacing)
    return float(value)
