"""The naming rule of seed variants, shared by the trainers (which define them) and by the commands that run and
compare them (which must not import the trainers, and with them nnU-Net's training stack).

``{trainer}_seed{K}`` is ``{trainer}`` seeded with K (``nnUNetTrainerLLM_10epochs_25iters_seed2``): its own class,
so its own model folder. The seed suffix always comes last.
"""

from __future__ import annotations

import re

_SEED_SUFFIX = re.compile(r"^(?P<base>.+)_seed(?P<seed>0|[1-9][0-9]*)$")


def seeded_name(trainer: str, seed: int) -> str:
    """``trainer`` seeded with ``seed``: ``seeded_name('nnUNetTrainerLLM', 2) == 'nnUNetTrainerLLM_seed2'``."""
    if seed < 0:
        raise ValueError(f"a seed is a non-negative integer, got {seed}")
    return f"{trainer}_seed{seed}"


def split_seed(name: str) -> tuple[str, int | None]:
    """Inverse of ``seeded_name``: ``('nnUNetTrainerLLM', 2)`` for ``nnUNetTrainerLLM_seed2``, ``(name, None)`` for a
    name without a seed suffix."""
    match = _SEED_SUFFIX.match(name)
    return (match["base"], int(match["seed"])) if match else (name, None)
