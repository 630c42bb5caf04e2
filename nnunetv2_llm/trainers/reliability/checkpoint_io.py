"""Checkpoint files: written atomically, read without running code.

nnU-Net's ``save_checkpoint`` calls ``torch.save`` straight onto the final name, so a kill while writing leaves a
truncated ``checkpoint_latest.pth`` that ``--c`` then fails on. Here a checkpoint goes to a temporary file in the
same folder, flushed and fsynced, then replaces the old one with ``os.replace`` (atomic on POSIX and Windows). The
plans.json/dataset.json copies nnU-Net writes when training starts are written the same way.

Reading uses ``torch.load(weights_only=True)`` (numpy scalars allowed), so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nnunetv2_llm.common.atomic_files import atomic_file
from nnunetv2_llm.llm.source import ENV_ALLOW_PICKLE, pickle_allowed

CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order


def atomic_torch_save(obj: Any, filename: str | os.PathLike) -> None:
    with atomic_file(filename, "wb") as f:
        torch.save(obj, f)


def atomic_save_json(obj: Any, filename: str | os.PathLike, indent: int = 4, sort_keys: bool = True) -> None:
    """Same output as batchgenerators' ``save_json`` (which nnU-Net uses), written atomically."""
    with atomic_file(filename, "w") as f:
        json.dump(obj, f, sort_keys=sort_keys, indent=indent)


@contextlib.contextmanager
def atomic_json_in_nnunet_trainer() -> Iterator[None]:
    """nnU-Net's on_train_start writes plans.json and dataset.json with a plain ``save_json``: make those two
    writes atomic too (a truncated plans.json would break prediction and the next ``--c``)."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = getattr(module, "save_json", None)
    if original is None:
        yield
        return
    module.save_json = atomic_save_json
    try:
        yield
    finally:
        module.save_json = original


class CheckpointUnreadable(Exception):
    """The file is truncated or corrupt (``security`` False) or needs unpickling of arbitrary objects (True)."""

    def __init__(self, path: str, reason: str, security: bool = False):
        self.path, self.reason, self.security = path, reason, security
        super().__init__(f"{path}: {reason}")


def _numpy_safe_globals() -> list:
    """What an nnU-Net checkpoint needs besides tensors and builtins: numpy scalars (the logger's values)."""
    import numpy.dtypes as npd

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore
    dtype_classes = [getattr(npd, name) for name in dir(npd) if name.endswith("DType")]
    return [scalar, np.dtype, *dtype_classes]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` (tensors, numbers, strings, containers, numpy scalars: nothing that
    can run code). ``nnUNet_LLM_ALLOW_PICKLE=1`` allows full unpickling for a checkpoint the user trusts.

    Raises:
        CheckpointUnreadable: truncated, corrupt, not an nnU-Net checkpoint, or (``security``) needing unpickling
            of arbitrary objects without the opt-in.
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower() and "unsupported global" not in str(e).lower():
            raise CheckpointUnreadable(path, f"{type(e).__name__}: {e}") from None
        checkpoint = _load_pickled(path, map_location, e)
    except Exception as e:  # truncated zip, empty file, disk error
        raise CheckpointUnreadable(path, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointUnreadable(path, "not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


def _load_pickled(path: str, map_location: Any, refusal: pickle.UnpicklingError) -> Any:
    """Full unpickling, only on the documented opt-in; ``refusal`` is the weights-only load's error."""
    if not pickle_allowed():
        first = next((line.strip() for line in str(refusal).splitlines() if "Unsupported global" in line), "")
        raise CheckpointUnreadable(
            path, f"it holds pickled objects other than tensors and numbers ({first[:120]}); loading it could "
            f"run code, so it is refused. If you trust this file, set {ENV_ALLOW_PICKLE}=1", security=True
        ) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointUnreadable(path, f"{type(e).__name__}: {e}") from None
