"""Seed variants: ``{trainer}_seed{K}`` is any trainer of this package or of nnU-Net (budgets and data fractions
included: ``nnUNetTrainerLLM_10epochs_25iters_seed2``) seeded with K, made when nnU-Net's lookup asks for it.

A seed variant seeds Python, NumPy and torch before the network is built and at every (re)start of training
(``reliability.seeding``), so the block's projections, a random control's layer (its seed is K too) and nnU-Net's
patch sampling and augmentation follow K; its own class name gives it its own model folder, so seeds never share
one. What is bit-reproducible: see ``reliability.seeding``.
"""

from __future__ import annotations

from collections.abc import Mapping

from nnunetv2_llm.common.trainer_names import split_seed
from nnunetv2_llm.trainers.reliability import ReliabilityMixin


def _nnunet_trainer(name: str) -> type | None:
    """nnU-Net's own trainer class of that name (``nnUNetTrainer``, ``nnUNetTrainer_5epochs``, ...), or None."""
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                       "nnunetv2.training.nnUNetTrainer")


def seeded_trainer(name: str, known: Mapping[str, object], module: str) -> type | None:
    """The seed variant ``name`` names, or None when ``name`` is not ``{trainer}_seed{K}`` of a known trainer.

    Args:
        name: the requested class name.
        known: this package's trainer classes by name (a seed variant's trainer is looked up here first, then
            among nnU-Net's own).
        module: the module the class is registered in (its ``__module__``, so that pickle finds it again).

    Returns:
        A new class: the trainer with ``llm_seed = K`` (and ``ReliabilityMixin``, which does the seeding, in front of
        an nnU-Net trainer that lacks it).
    """
    base_name, seed = split_seed(name)
    if seed is None or split_seed(base_name)[1] is not None:  # one seed suffix only
        return None
    base = known.get(base_name)
    if not isinstance(base, type):
        base = _nnunet_trainer(base_name)
    if base is None:
        return None
    bases = (base,) if issubclass(base, ReliabilityMixin) else (ReliabilityMixin, base)
    return type(name, bases, {"__module__": module, "__qualname__": name, "llm_seed": seed,
                              "__doc__": f"{base_name} seeded with {seed} (see nnunetv2_llm.trainers.variants.seeds)."})
