"""Head-to-head comparison of nnU-Net v2 trainers on their cross-validation predictions.

Reads each dataset's, trainer's (and seed's) and fold's validation predictions from nnUNet_results and the ground
truth from nnUNet_preprocessed (with nnU-Net's reader for the dataset), computes per-case Dice, NSD and HD95, pairs
cases across trainers and writes ``per_case_metrics.csv``, ``ranking.csv``, ``report.md`` (paired statistics
against the first trainer per dataset, rankings across datasets), ``paired_differences.png`` and
``training_curves.png``. Each fold's expected validation cases are the ``val`` list of nnU-Net's
``splits_final.json``; without that file they are the predictions found. The outputs appear in the output folder
only when all of them are complete; an output folder that already holds something is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_llm.evaluation.compare.checks import CompareError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", nargs="+", required=True,
                        help="dataset ids or names, e.g. 4 27 or Dataset004_Hippocampus; several give one report "
                             "with a ranking across datasets")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="trainer class names; the first is the reference, e.g. nnUNetTrainer nnUNetTrainerLLM")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    add_protocol_arguments(parser)
    parser.add_argument("--nsd-tolerance-mm", nargs="+", default=None, metavar="MM|LABEL=MM",
                        help="NSD tolerance: one value in mm for every class, or LABEL=MM per label value "
                             "(others 1.0); default 1.0")
    parser.add_argument("-o", "--output-dir", type=Path, default=None,
                        help="default: reports/compare_<dataset>_<configuration>; must be empty or new")
    parser.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty output folder")
    parser.add_argument("--workers", type=int, default=2, help="processes for the metric computation")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--seeds`` and ``--nsd-method``, shared with head-to-head."""
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="compare the seed variants <trainer>_seed<K> of every trainer; each case's metrics are "
                             "averaged over the seeds for the paired tests and rankings")
    parser.add_argument("--nsd-method", choices=("surface", "boundary"), default="surface",
                        help="NSD convention: surface elements weighted by area (Nikolov et al., default) or "
                             "boundary voxels counted once")


def main(args: argparse.Namespace) -> int:
    from nnunetv2_llm.evaluation.compare.run import compare

    output_dir = args.output_dir or Path("reports") / f"compare_{'_'.join(args.dataset)}_{args.configuration}"
    report = compare(args.dataset, args.configuration, args.trainers, args.folds, output_dir, args.plans,
                     seeds=args.seeds, nsd_tolerance_mm=parse_tolerance(args.nsd_tolerance_mm),
                     nsd_method=args.nsd_method, workers=args.workers, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def parse_tolerance(values: Sequence[str] | None) -> float | dict[int, float] | None:
    """``--nsd-tolerance-mm``: None, one number of mm, or ``{label value: mm}`` from LABEL=MM pairs."""
    if not values:
        return None
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [(int(label), float(mm)) for label, mm in (v.split("=") for v in values)]
    except ValueError:
        raise CompareError(f"--nsd-tolerance-mm: give one number or LABEL=MM pairs, got {' '.join(values)}") from None
    labels = [label for label, _ in pairs]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise CompareError(f"--nsd-tolerance-mm: label {repeated} is given twice; give each label once")
    return dict(pairs)
