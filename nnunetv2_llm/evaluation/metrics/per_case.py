"""Dice, NSD and HD95 of one case, per label, with the conventions that keep every case in the means.

Empty masks (MONAI returns NaN or inf there) follow a MetricsReloaded-style convention, so no value is NaN:

* reference and prediction both empty: Dice 1, NSD 1, HD95 0 (a correct "absent" call);
* exactly one of them empty: Dice 0, NSD 0, HD95 = the image diagonal in mm,
  ``sqrt(sum((shape_i * spacing_i) ** 2))`` -- the largest distance possible inside the image,
  i.e. a finite worst case instead of inf.

Single-slice volumes: 2D data is often stored as a 1xHxW volume (and nnU-Net's SimpleITK reader gives a 2D
image a fake first axis with spacing 999 x the largest spacing). A 3D binary erosion treats every voxel of
such a volume as surface, and the fake axis would dominate the image diagonal, so axes of length 1 are dropped
together with their spacing (down to two axes) before anything is computed: the case is measured as the 2D
image it is.

NSD tolerance: the default 1.0 mm is a common challenge default (e.g. FLARE), roughly one voxel
at the ~1 mm in-plane resolution of typical CT/MR, so it accepts a one-voxel boundary
disagreement and nothing more. Ideally the tolerance is the inter-rater variability of each
structure (Nikolov et al. 2021, Metrics Reloaded); pass a per-label mapping when that is known.
Note that with thick slices (e.g. 3 mm) a one-slice shift exceeds 1 mm.

NSD convention: ``nsd_method`` ``"surface"`` (default, Nikolov et al.'s surface elements) or ``"boundary"``
(boundary voxels); see ``surface_dice``.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from nnunetv2_llm.evaluation.metrics.dice import dice
from nnunetv2_llm.evaluation.metrics.hausdorff import hausdorff95
from nnunetv2_llm.evaluation.metrics.surface_dice import surface_dice

DEFAULT_NSD_TOLERANCE_MM = 1.0
DEFAULT_NSD_METHOD = "surface"


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image diagonal in mm.

    Args:
        shape: the image's size per axis.
        spacing: voxel size in mm per axis, in the same axis order.

    Returns:
        ``sqrt(sum((shape_i * spacing_i) ** 2))``.
    """
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float,
                   nsd_method: str = DEFAULT_NSD_METHOD) -> dict:
    """Dice, NSD and HD95 of two boolean masks, with the module's empty-mask and single-slice conventions.

    Args:
        pred: predicted mask, shape ``(d0, d1[, d2])``; axes of length 1 are dropped (down to two axes).
        ref: reference mask, same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order.
        nsd_tolerance_mm: NSD tolerance in mm.
        nsd_method: ``"surface"`` or ``"boundary"`` (see ``surface_dice``).

    Returns:
        ``{dice, nsd, hd95, ref_empty, pred_empty}``; HD95 in mm.

    Raises:
        ValueError: the masks' shapes differ, ``spacing`` has not one value per axis, or ``nsd_method`` is unknown.
    """
    if pred.shape != ref.shape or len(spacing) != ref.ndim:
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref.shape}, spacing {tuple(spacing)}")
    pred, ref, spacing = _drop_single_slice_axes(pred, ref, spacing)
    ref_empty, pred_empty = not ref.any(), not pred.any()
    out = {"ref_empty": ref_empty, "pred_empty": pred_empty}
    if ref_empty and pred_empty:
        return {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, **out}
    if ref_empty or pred_empty:
        return {"dice": 0.0, "nsd": 0.0, "hd95": image_diagonal_mm(ref.shape, spacing), **out}
    return {"dice": dice(pred, ref), "nsd": surface_dice(pred, ref, spacing, nsd_tolerance_mm, nsd_method),
            "hd95": hausdorff95(pred, ref, spacing), **out}


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int],
    nsd_tolerance_mm: float | Mapping[int, float] = DEFAULT_NSD_TOLERANCE_MM,
    nsd_method: str = DEFAULT_NSD_METHOD,
) -> list[dict]:
    """Metrics of one case for each label of two integer label maps.

    Args:
        pred: predicted label map, shape ``(d0, d1[, d2])`` (any axis order, e.g. z, y, x).
        ref: reference label map, same shape as ``pred``.
        spacing: voxel size in mm per axis, in the same axis order as the arrays.
        labels: label values to evaluate (usually every foreground label).
        nsd_tolerance_mm: NSD tolerance in mm, one value for all labels or ``{label: mm}``
            (labels missing from the mapping use ``DEFAULT_NSD_TOLERANCE_MM``).
        nsd_method: ``"surface"`` or ``"boundary"`` (see ``surface_dice``).

    Returns:
        One dict per label: ``{label, dice, nsd, hd95, ref_empty, pred_empty}``; HD95 in mm.

    Raises:
        ValueError: as ``binary_metrics``.
    """
    rows = []
    for label in labels:
        tol = (
            nsd_tolerance_mm.get(label, DEFAULT_NSD_TOLERANCE_MM)
            if isinstance(nsd_tolerance_mm, Mapping)
            else nsd_tolerance_mm
        )
        rows.append({"label": label, **binary_metrics(pred == label, ref == label, spacing, tol, nsd_method)})
    return rows


def _drop_single_slice_axes(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Both masks and the spacing without their length-1 axes, keeping at least two axes (see module doc)."""
    drop = [axis for axis, n in enumerate(ref.shape) if n == 1][: max(ref.ndim - 2, 0)]
    keep = [axis for axis in range(ref.ndim) if axis not in drop]
    return pred.squeeze(tuple(drop)), ref.squeeze(tuple(drop)), [float(spacing[axis]) for axis in keep]
