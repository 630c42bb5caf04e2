"""Rankings across tasks against hand-computed values, and compare's report across datasets and seeds."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_compare import DATASET, DATASET_JSON, LLM, LOG, REF, ground_truth, llm_prediction, write
from test_metrics import shifted_cube_surface

from nnunetv2_llm.evaluation.compare.checks import CompareError
from nnunetv2_llm.evaluation.compare.cli import add_arguments, main
from nnunetv2_llm.evaluation.compare.compute import training_time
from nnunetv2_llm.evaluation.compare.run import compare
from nnunetv2_llm.evaluation.compare.tables import seed_spread
from nnunetv2_llm.evaluation.ranking import (
    BOOTSTRAP_RESAMPLES,
    CONSENSUS,
    RANKING_COLUMNS,
    aggregate_then_rank,
    bootstrap_ranks,
    consensus,
    mean_case_rank,
    rank,
    ranking_table,
    significant_wins,
    task_ranking,
)

# 4 cases x 3 trainers, higher is better: A wins every case, B and C alternate.
VALUES = np.array([[0.9, 0.5, 0.6],
                   [0.8, 0.7, 0.3],
                   [0.95, 0.4, 0.5],
                   [0.7, 0.6, 0.2]])


def test_rank_direction_and_ties():
    assert rank(np.array([0.5, 0.9, 0.5]), higher_is_better=True).tolist() == [2, 1, 2]
    assert rank(np.array([3.0, 1.0, 3.0, 0.5]), higher_is_better=False).tolist() == [3, 2, 3, 1]


def test_aggregate_then_rank_and_rank_then_aggregate_can_disagree():
    # means 0.8375, 0.55, 0.40 -> A, B, C; per-case ranks B: 3, 2, 3, 2 and C: 2, 3, 2, 3 -> both 2.5
    assert aggregate_then_rank(VALUES, True).tolist() == [1, 2, 3]
    assert mean_case_rank(VALUES, True).tolist() == [1.0, 2.5, 2.5]
    assert aggregate_then_rank(VALUES, False).tolist() == [3, 2, 1]  # HD95-like: lower is better


def test_significance_counts_the_trainers_one_is_significantly_better_than():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.7, 12)
    steps = np.arange(1, 13) / 100  # distinct gains: the exact test applies
    values = np.stack([base + 0.1 + steps, base, base + rng.permutation(np.r_[steps[:6], -steps[6:]])], axis=1)
    # A beats B and C on all 12 cases: exact p = 2 / 2**12, Holm x3 < 0.05; B vs C: mixed signs, not significant
    assert significant_wins(values, higher_is_better=True).tolist() == [2, 0, 0]
    assert significant_wins(-values, higher_is_better=False).tolist() == [2, 0, 0]
    assert significant_wins(values[:5], higher_is_better=True).tolist() == [0, 0, 0]  # 5 cases: p >= 2/32


def test_bootstrap_stability_against_the_resampling_probabilities():
    # 2 cases: A = (1, 0), B = (0.6, 0.6). A ranks 2nd; resampling case 0 twice (probability 1/4) puts it first.
    values = np.array([[1.0, 0.6], [0.0, 0.6]])
    ranking, boot = task_ranking(values, True, np.random.default_rng(0))
    assert ranking["aggregate_then_rank"].tolist() == [2, 1]
    assert boot.shape == (BOOTSTRAP_RESAMPLES, 2)
    assert ranking["bootstrap_keeps_rank"] == pytest.approx([0.75, 0.75], abs=0.05)  # binomial sd 0.014
    again = bootstrap_ranks(values, True, np.random.default_rng(0))
    assert np.array_equal(boot, again)  # fixed seed


def test_consensus_ranks_the_mean_rank_over_tasks():
    rng = np.random.default_rng(0)
    first, boot1 = task_ranking(VALUES, True, rng)
    second, boot2 = task_ranking(VALUES[:, [2, 1, 0]], True, rng)  # A and C swap places
    result = consensus([first, second], [boot1, boot2])
    assert result["aggregate_then_rank"].tolist() == [1, 1, 1]  # mean ranks 2, 2, 2
    assert result["significant_wins"].tolist() == (first["significant_wins"] + second["significant_wins"]).tolist()


def test_ranking_table_has_every_task_and_a_consensus():
    rows = [{"dataset": d, "trainer": t, "fold": 0, "case": f"c{i}", "label_name": n, "dice": VALUES[i, j],
             "nsd": VALUES[i, j], "hd95": 1 - VALUES[i, j]}
            for d in ("D1", "D2") for n in ("a", "b") for i in range(4) for j, t in enumerate("ABC")]
    table = ranking_table(pd.DataFrame(rows), list("ABC"))
    assert list(table.columns) == RANKING_COLUMNS
    assert len(table) == 3 * (4 + 1) * 3  # metrics x (tasks + consensus) x trainers
    hd95 = table[(table.metric == "hd95") & (table.dataset == CONSENSUS)]
    assert hd95.aggregate_then_rank.tolist() == [1, 2, 3]  # lower HD95 = higher Dice here
    dice = table[(table.metric == "dice") & (table.dataset == "D1") & (table["class"] == "a")]
    assert dice["mean"].tolist() == pytest.approx(VALUES.mean(axis=0))


def test_seed_spread_by_hand():
    rows = [{"trainer": t, "seed": s, "fold": f, "label": 1, "label_name": "a", "dice": v, "nsd": v, "hd95": v}
            for t, s, f, v in (("R", 0, 0, 0.8), ("R", 0, 1, 0.6), ("R", 1, 0, 0.9), ("R", 1, 1, 0.9),
                               ("X", 0, 0, 0.5), ("X", 0, 0, 0.7), ("X", 0, 1, 0.6), ("X", 1, 0, 0.7),
                               ("X", 1, 1, 0.7))]
    spread = seed_spread(pd.DataFrame(rows), ["R", "X"])
    dice = spread[spread.metric == "dice"].set_index("trainer")
    # R: seeds 0.7 and 0.9; X: seed 0 = mean(0.6, 0.6) (fold 0 has two cases), seed 1 = 0.7
    assert dice.loc["R", ["seeds", "mean", "sd"]].tolist() == pytest.approx([2, 0.8, math.sqrt(0.02)])
    assert dice.loc["X", ["mean", "sd", "diff"]].tolist() == pytest.approx([0.65, math.sqrt(0.005), -0.15])


def test_training_time_from_the_checkpoint_and_from_resumed_logs(tmp_path):
    logging = {"epoch_start_timestamps": [0.0, 4000.0, 9000.0], "epoch_end_timestamps": [1800.0, 5800.0]}
    torch.save({"network_weights": {}, "logging": logging, "init_args": {"device": torch.device("cuda", 0)}},
               tmp_path / "checkpoint_latest.pth")
    assert training_time(tmp_path) == (1.0, 2, "cuda", "checkpoint_latest.pth")  # the unfinished epoch is left out
    logs = tmp_path / "logs"
    logs.mkdir()
    timed = LOG.replace("Epoch time: 1.0 s", "Epoch time: {t} s")
    (logs / "training_log_2025_1_1_09_00_00.txt").write_text(
        "x: INFO: torch.compile disabled because device is CPU \n"
        + timed.format(e=0, tr=1, va=1, d1=0, d2=0, t=1800.0) + timed.format(e=1, tr=1, va=1, d1=0, d2=0, t=99.0))
    (logs / "training_log_2025_1_1_10_00_00.txt").write_text(timed.format(e=1, tr=1, va=1, d1=0, d2=0, t=900.0))
    assert training_time(logs) == (0.75, 2, "cpu", "training_log_*.txt")  # the resumed epoch 1 counts once
    assert training_time(tmp_path / "none") == (None, 0, "?", "none found")


# ------------------------------------------------------------------------------- compare: datasets x seeds
OTHER = "Dataset027_Other"
CASES = {0: ["hippocampus_001", "hippocampus_002", "hippocampus_003"], 1: ["hippocampus_004", "hippocampus_006"]}


def layout(root: Path) -> Path:
    """Two datasets, both trainers with seeds 0 and 1; the LLM's seed 1 predicts like the reference."""
    for dataset in (DATASET, OTHER):
        preprocessed = root / "preprocessed" / dataset
        for case in (c for cases in CASES.values() for c in cases):
            write(preprocessed / "gt_segmentations" / f"{case}.nii.gz", ground_truth())
        (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
        for trainer in (REF, LLM):
            for seed in (0, 1):
                model = root / "results" / dataset / f"{trainer}_seed{seed}__nnUNetPlans__3d_fullres"
                for fold, cases in CASES.items():
                    for case in cases:
                        good = trainer == REF or seed == 1
                        write(model / f"fold_{fold}" / "validation" / f"{case}.nii.gz",
                              ground_truth() if good else llm_prediction(case))
                    torch.save({"network_weights": {}, "init_args": {"device": torch.device("cpu")},
                                "logging": {"epoch_start_timestamps": [0.0], "epoch_end_timestamps": [360.0],
                                            "train_losses": [1.0], "val_losses": [1.0], "mean_fg_dice": [0.5]}},
                               model / f"fold_{fold}" / "checkpoint_final.pth")
    return root


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Path:
    root = layout(tmp_path_factory.mktemp("protocol"))
    return compare([DATASET, OTHER], "3d_fullres", [REF, LLM], [0, 1], root / "out", seeds=[0, 1],
                   results_root=root / "results", preprocessed_root=root / "preprocessed", workers=1)


def test_one_report_for_datasets_and_seeds(protocol):
    text = protocol.read_text()
    assert f"# Trainer comparison: {DATASET}, {OTHER}, 3d_fullres (nnUNetPlans)" in text
    assert text.index(f"## {DATASET}") < text.index(f"## {OTHER}") < text.index("## Ranking across datasets")
    assert "Seeds: 0, 1" in text and "mean over its seeds" in text
    # per case the LLM's seeds average a shifted Anterior (Dice 0.75) and a perfect one
    assert text.count("| Anterior | Dice | 1.0000 ± 0.0000 | 0.8750 ± 0.0000 |") == 2
    assert text.count("| Anterior | Dice | nnUNetTrainerLLM | 2 | 0.8750 ± 0.1768 | -0.1250 |") == 2  # sd(0.75, 1)
    assert f"| {LLM} | Anterior | Dice | -0.1250 ± 0.0000 | [-0.1250, -0.1250] | 0.0625 | 0.375 | 0 / 5 / 0 | " \
           "permutation |" in text  # 5 tied differences: 2 of 32 sign patterns
    assert f"| {DATASET} | {REF} | cpu | 0.40 | 4 of 4 | 4 | checkpoint_final.pth |" in text  # 4 x 360 s


def test_ranking_csv_across_datasets(protocol):
    ranking = pd.read_csv(protocol.parent / "ranking.csv")
    assert set(ranking.dataset) == {DATASET, OTHER, CONSENSUS}
    consensus_rows = ranking[ranking.dataset == CONSENSUS].set_index(["metric", "trainer"])
    for metric in ("dice", "nsd", "hd95"):
        assert consensus_rows.loc[(metric, REF), "aggregate_then_rank"] == 1
        assert consensus_rows.loc[(metric, LLM), "aggregate_then_rank"] == 2
    anterior = ranking[(ranking.metric == "nsd") & (ranking["class"] == "Anterior") & (ranking.trainer == LLM)]
    area, on_other, face_z = shifted_cube_surface(2.0, 0.8)
    assert anterior["mean"].tolist() == pytest.approx([(1 + (on_other + 8 * face_z) / area) / 2] * 2, abs=1e-6)
    per_case = pd.read_csv(protocol.parent / "per_case_metrics.csv")
    assert len(per_case) == 2 * 2 * 2 * 5 * 2  # datasets x trainers x seeds x cases x labels
    assert set(per_case.seed) == {0, 1} and set(per_case.trainer) == {REF, LLM}


def test_boundary_nsd_on_the_command_line(tmp_path, monkeypatch):
    root = layout(tmp_path)
    for name in ("results", "preprocessed"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    assert main(parser.parse_args(["-d", DATASET, "-tr", REF, LLM, "-f", "0", "--seeds", "0", "--nsd-method",
                                   "boundary", "-o", str(out), "--workers", "1"])) == 0
    per_case = pd.read_csv(out / "per_case_metrics.csv")
    anterior = per_case[(per_case.trainer == LLM) & (per_case.label == 1)]
    assert anterior.nsd.tolist() == pytest.approx([40 / 56] * 3, abs=1e-6)  # boundary voxels, see test_metrics
    assert "NSD (`--nsd-method boundary`): boundary-voxel NSD" in (out / "report.md").read_text()


@pytest.mark.parametrize(("argv", "problem"), [
    (["--seeds", "0", "0"], "--seeds: give distinct non-negative integers"),
    (["--seeds", "-1"], "--seeds: give distinct non-negative integers"),
    (["-d", "4", "4"], "give at least one dataset, each once"),
])
def test_bad_protocol_options_are_one_line_exit_2(argv, problem, capsys):
    from nnunetv2_llm import cli

    args = ["compare", "-d", "4", "-tr", REF, LLM, *argv] if argv[0] != "-d" else ["compare", *argv, "-tr", REF, LLM]
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and problem in err[0], err


def test_a_missing_seed_names_its_training_command(tmp_path):
    root = layout(tmp_path)
    with pytest.raises(CompareError, match=f"nnUNetv2_train 4 3d_fullres 0 -tr {LLM}_seed2"):
        compare(DATASET, "3d_fullres", [REF, LLM], [0], tmp_path / "out", seeds=[0, 2],
                results_root=root / "results", preprocessed_root=root / "preprocessed", workers=1)
