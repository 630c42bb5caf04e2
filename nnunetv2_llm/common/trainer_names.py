"""The naming rule of seed variants, shared by the trainers (which define them) and by the commands that run and
compare them (which must not import the trainers, and with them nnU-Net's training stack).

``{trainer}_seed{K}`` is ``{trainer}`` seeded with K (``nnUNetTrainerLLM_10epochs_25iters_seed2``): its own class,
so its own model folder. The seed suffix always comes last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nnunetv2_llm.common.errors import LLMSettingError

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


def check_seeds(seeds: Sequence[int] | None) -> None:
    """The one check of a ``--seeds`` list: None (no seeds), or distinct non-negative integers.

    Raises:
        LLMSettingError: (``--seeds``) an empty list, a repeated or negative seed, or a non-integer.
    """
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)
                              or any(not isinstance(s, int) or s < 0 for s in seeds)):
        raise LLMSettingError(f"--seeds: give distinct non-negative integers, got {list(seeds)} (seeds must be "
                              "distinct: each seed is one model folder per trainer)", "--seeds")


def seed_runs(trainers: Sequence[str], seeds: Sequence[int] | None) -> dict[str, tuple[str, int | None]]:
    """``{trainer class trained: (trainer, seed)}``, trainer by trainer: ``trainers`` themselves (seed None) without
    ``seeds``, else each one once per seed (``seeded_name``)."""
    if seeds is None:
        return {trainer: (trainer, None) for trainer in trainers}
    return {seeded_name(trainer, seed): (trainer, seed) for trainer in trainers for seed in seeds}
