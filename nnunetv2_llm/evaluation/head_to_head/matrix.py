"""The head-to-head as independent trainings: datasets x trainers x seeds x folds, one ``nnUNetv2_train`` each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_llm.common.trainer_names import seed_runs


@dataclass(frozen=True)
class TrainingJob:
    """One training of the matrix; ``trainer`` is the class trained (with its ``_seedK`` suffix when seeded)."""

    dataset_id: int
    configuration: str
    trainer: str
    fold: str
    plans: str = "nnUNetPlans"

    @property
    def name(self) -> str:
        """``Dataset004_nnUNetTrainerLLM_seed0_f0``: unique within a head-to-head, usable as a file name."""
        return f"Dataset{self.dataset_id:03d}_{self.trainer}_f{self.fold}"

    def log_path(self, output_dir: Path) -> Path:
        """The job's log (nnU-Net's own output) under the head-to-head's output folder."""
        return Path(output_dir) / "logs" / f"{self.name}.log"


def job_matrix(dataset_ids: Sequence[int], configuration: str, trainers: Sequence[str], folds: Sequence[int | str],
               seeds: Sequence[int] | None = None, plans: str = "nnUNetPlans") -> list[TrainingJob]:
    """Every training of the head-to-head, dataset by dataset, then fold by fold (so that a dataset's first folds
    of every trainer finish first and partial results are already comparable).

    Args:
        dataset_ids: nnU-Net dataset ids.
        configuration, plans: nnU-Net's configuration and plans identifier.
        trainers: the compared trainers (un-seeded names).
        folds: cross-validation folds.
        seeds: None (each trainer once) or the seeds each trainer is trained with.

    Returns:
        The jobs, without duplicates.
    """
    names = list(seed_runs(trainers, seeds))
    jobs = [TrainingJob(dataset_id, configuration, name, str(fold), plans)
            for dataset_id in dataset_ids for fold in folds for name in names]
    return list(dict.fromkeys(jobs))
