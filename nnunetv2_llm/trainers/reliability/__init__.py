"""Reliability for long nnU-Net runs: atomic checkpoints, exact resume, no silent NaN, graceful SIGTERM, seeding.

``ReliabilityMixin`` (``mixin.py``) goes in front of ``nnUNetTrainer`` (or any subclass) in a trainer's bases. It
is composed of one mixin per concern:

- ``checkpoints.py``: checkpoints written atomically after every epoch, checked on load (shapes, the frozen LLM
  layer's checksum), unreadable ones kept as ``*.corrupt`` with a fallback; checksums of the loaded state logged.
- ``nan_guard.py``: a non-finite loss or gradient norm skips the step; too many in a row stop with exit code 3.
- ``signals.py``: SIGTERM ends training with a one-line message saying which epoch ``--c`` continues from.
- ``seeding.py``: ``nnUNet_LLM_SEED`` seeds Python, NumPy and torch.

and of helpers other modules use: ``checkpoint_io.py`` (atomic ``torch.save``, the safe ``load_checkpoint_file``)
and ``fingerprints.py`` (checksums of a training state).
"""

from nnunetv2_llm.trainers.reliability.checkpoint_io import (
    CheckpointUnreadable,
    atomic_save_json,
    atomic_torch_save,
    load_checkpoint_file,
)
from nnunetv2_llm.trainers.reliability.fingerprints import parse_fingerprints, state_fingerprints, tree_sha256
from nnunetv2_llm.trainers.reliability.mixin import ReliabilityMixin

__all__ = ["ReliabilityMixin", "CheckpointUnreadable", "atomic_save_json", "atomic_torch_save", "load_checkpoint_file",
           "parse_fingerprints", "state_fingerprints", "tree_sha256"]
