"""Training compute of one fold: the summed epoch times (hours) and the device, from the fold's checkpoint or
nnU-Net's text logs.

Sources, first readable wins: ``checkpoint_final.pth`` and ``checkpoint_latest.pth`` (``logging`` holds
``epoch_start_timestamps`` and ``epoch_end_timestamps`` for every epoch, across resumed runs; ``init_args`` the
device), then the ``training_log_*.txt`` files (``Epoch time: X s`` per epoch, 0.01 s resolution; a later log
overrides the epochs it repeats; the device only where nnU-Net names it). Epoch times cover training and the
per-epoch validation, not preprocessing, waiting, or the final validation with mirroring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r": Epoch time: (\S+) s")
_CPU_LINE = "device is CPU"  # nnU-Net's 'torch.compile disabled because device is CPU'


class TrainingTime(NamedTuple):
    """One fold's compute: hours (None: unknown), epochs timed, device ('cuda', 'cpu', 'mps' or '?') and source."""

    hours: float | None
    epochs: int
    device: str
    source: str


def training_time(fold_dir: Path) -> TrainingTime:
    """The summed epoch times of one fold.

    Args:
        fold_dir: nnU-Net's ``fold_<f>`` folder.

    Returns:
        The fold's ``TrainingTime``; hours None and source 'none found' when nothing is readable.
    """
    from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold_dir / name).is_file():
            try:
                return _from_checkpoint(fold_dir / name)
            except CheckpointUnreadable:
                continue
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    if logs:
        return _from_logs(logs)
    return TrainingTime(None, 0, "?", "none found")


def _from_checkpoint(path: Path) -> TrainingTime:
    from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable, load_checkpoint_file

    checkpoint = load_checkpoint_file(path)
    log = checkpoint.get("logging")
    if not isinstance(log, dict) or "epoch_end_timestamps" not in log:
        raise CheckpointUnreadable(str(path), "it holds no epoch timestamps")
    ends, starts = log["epoch_end_timestamps"], log.get("epoch_start_timestamps", [])
    seconds = [float(e) - float(s) for s, e in zip(starts, ends, strict=False)]  # an epoch in progress has no end
    device = getattr((checkpoint.get("init_args") or {}).get("device"), "type", None) or "?"
    return TrainingTime(sum(seconds) / 3600, len(seconds), device, path.name)


def _from_logs(logs: Sequence[Path]) -> TrainingTime:
    seconds: dict[int, float] = {}
    epoch, cpu = None, False
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            cpu = cpu or _CPU_LINE in line
            if m := _EPOCH.search(line):
                epoch = int(m[1])
            elif (m := _EPOCH_TIME.search(line)) and epoch is not None:
                seconds[epoch] = float(m[1])
    return TrainingTime(sum(seconds.values()) / 3600 if seconds else None, len(seconds), "cpu" if cpu else "?",
                        "training_log_*.txt")
