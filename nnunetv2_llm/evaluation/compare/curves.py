"""Training curves of one fold (per-epoch losses and pseudo Dice) from its checkpoint or nnU-Net's text logs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

CURVES = {"train_loss": "train loss", "val_loss": "validation loss", "pseudo_dice": "pseudo Dice (mean foreground)"}
Curves = Mapping[tuple[str, int], tuple[pd.DataFrame | None, str]]  # {(trainer, fold): (curves, where from)}

_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_VALUES = {"train_loss": re.compile(r": train_loss (\S+)"), "val_loss": re.compile(r": val_loss (\S+)")}
_PSEUDO_DICE = re.compile(r": Pseudo dice \[(.*)\]")


def training_curves(fold_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """Per-epoch ``epoch, train_loss, val_loss, pseudo_dice`` of one fold (None when nothing is readable) and
    where they came from.

    Source order: ``checkpoint_final.pth`` (key ``'logging'``), the ``training_log_*.txt`` files
    (a running training logs every epoch), ``checkpoint_latest.pth``. An unreadable checkpoint is skipped and
    named in the description.
    """
    from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable

    final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    sources = [(final.name, final.is_file(), lambda: _curves_from_checkpoint(final)),
               ("training_log_*.txt", bool(logs), lambda: _curves_from_logs(logs)),
               (latest.name, latest.is_file(), lambda: _curves_from_checkpoint(latest))]
    unreadable = []
    for name, present, read in sources:
        if not present:
            continue
        try:
            curves = read()
        except CheckpointUnreadable as e:
            unreadable.append(f"{name} unreadable: {e.reason}")
            continue
        return curves, name + (f" ({'; '.join(unreadable)})" if unreadable else "")
    if unreadable:
        return None, f"no readable checkpoint or training log ({'; '.join(unreadable)})"
    return None, "no checkpoint or training log found"


def epochs_trained(curves: Curves) -> dict[tuple[str, int], int | None]:
    """Epochs per ``(trainer, fold)``: the length of its curves, None where none were found."""
    return {key: None if found is None else len(found) for key, (found, _) in curves.items()}


def _curves_from_checkpoint(path: Path) -> pd.DataFrame:
    from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable, load_checkpoint_file

    log = load_checkpoint_file(path).get("logging")  # weights_only: nothing in it can run code
    columns = {"train_loss": "train_losses", "val_loss": "val_losses", "pseudo_dice": "mean_fg_dice"}
    if not isinstance(log, dict) or any(k not in log for k in columns.values()):
        raise CheckpointUnreadable(str(path), "it holds no training log ('logging' with the losses)")
    n = min(len(log[k]) for k in columns.values())
    return pd.DataFrame({"epoch": range(n), **{c: np.asarray(log[k][:n], dtype=float) for c, k in columns.items()}})


def _curves_from_logs(logs: Sequence[Path]) -> pd.DataFrame:
    """Parse nnU-Net text logs; a later log (resumed training) overrides the epochs it repeats."""
    epochs: dict[int, dict[str, float]] = {}
    current = None
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if m := _EPOCH.search(line):
                current = int(m[1])
                epochs[current] = {}
            elif current is not None:
                epochs[current].update(_epoch_values(line))
    rows = [{"epoch": e, **epochs[e]} for e in sorted(epochs)]
    return pd.DataFrame(rows, columns=["epoch", *CURVES])


def _epoch_values(line: str) -> dict[str, float]:
    """The curve values one log line holds (none, a loss, or the pseudo Dice's foreground mean)."""
    values = {key: float(m[1]) for key, pattern in _VALUES.items() if (m := pattern.search(line))}
    if m := _PSEUDO_DICE.search(line):  # e.g. "[np.float32(0.81), np.float32(0.7)]"
        dice = [float(v) for v in re.sub(r"np\.\w+\(([^)]*)\)", r"\1", m[1]).split(",") if v.strip()]
        values["pseudo_dice"] = float(np.nanmean(dice)) if dice else np.nan
    return values
