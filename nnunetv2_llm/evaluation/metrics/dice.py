"""Dice similarity coefficient (MONAI's ``compute_dice``)."""

import numpy as np
from monai.metrics import compute_dice

from nnunetv2_llm.evaluation.metrics.monai_input import as_monai_batch, monai_warnings_silenced


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two non-empty boolean masks: ``2 |P & R| / (|P| + |R|)``.

    Args:
        pred: predicted mask, shape ``(d0, d1[, d2])``.
        ref: reference mask, same shape.

    Returns:
        Dice in [0, 1] (empty masks: see ``per_case``, which never passes them here).
    """
    with monai_warnings_silenced():
        value = compute_dice(as_monai_batch(pred), as_monai_batch(ref), include_background=True, ignore_empty=False)
    return float(value)
