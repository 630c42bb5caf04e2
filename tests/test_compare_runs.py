"""head-to-head and sweep-layers check what compare would refuse (trainers, folds, the output folder, a sweep
folder trained with another layer) before anything is prepared or trained; the sweep's figure colours."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import pandas as pd
import pytest
from test_bad_inputs import cli_error
from test_cli_errors import Reached, must_not_run, reached

from nnunetv2_llm.evaluation import head_to_head, sweep_layers
from nnunetv2_llm.evaluation.compare.cases import CSV_COLUMNS
from nnunetv2_llm.model.spec import LLMChoice, make_spec

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerLLM"]
SWEEP_TRAINER = "nnUNetTrainerLLM_50epochs"


@pytest.fixture
def no_training(monkeypatch):
    for module in (head_to_head, sweep_layers):
        monkeypatch.setattr(module, "prepare_dataset", must_not_run("dataset preparation"))
        monkeypatch.setattr(module, "train_all", must_not_run("training"))


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_head_to_head_refuses_repeated_trainers_and_folds_before_training(capsys, nnunet_folders, no_training):
    out = str(nnunet_folders / "out")
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", *TRAINERS, TRAINERS[0], "-o", out)
    assert "give at least two distinct trainers" in line and line.endswith("(fix: -tr)")
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", *TRAINERS, "-f", "0", "1", "0", "-o", out)
    assert "fold(s) 0 given more than once" in line and line.endswith("(fix: -f)")


def test_head_to_head_refuses_a_non_empty_output_folder_before_training(capsys, nnunet_folders, no_training,
                                                                        monkeypatch):
    out = nnunet_folders / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier comparison")
    line = cli_error(capsys, "head-to-head", "-d", "4", "-tr", *TRAINERS, "-o", str(out))
    assert f"output folder {out} is not empty" in line and line.endswith("(fix: -o / --overwrite)")
    monkeypatch.setattr(head_to_head, "prepare_dataset", reached)
    with pytest.raises(Reached):
        head_to_head.main(parse(head_to_head, ["-d", "4", "-tr", *TRAINERS, "-o", str(out), "--overwrite",
                                               "--device", "cpu"]))


def test_sweep_refuses_the_same_layer_twice_before_training(capsys, nnunet_folders, no_training, three_layer_llama):
    base = ["sweep-layers", "-d", "4", "-tr", SWEEP_TRAINER, "--llm-source", str(three_layer_llama),
            "-o", str(nnunet_folders / "out")]
    for layers, label in ((["0", "0"], "layer0"), (["-1", "2"], "layer2")):  # -1: layer 2 of this 3-layer model
        line = cli_error(capsys, *base, "--layers", *layers)
        assert "give at least two distinct trainers" in line and line.count(f"{SWEEP_TRAINER}_{label}") == 2
        assert line.endswith("(fix: --layers / --reference)")
    line = cli_error(capsys, *base, "--layers", "1")
    assert line.endswith("(fix: --layers / --reference)")
    line = cli_error(capsys, *base, "--layers", "0", "1", "-f", "0", "0")
    assert line.endswith("(fix: -f)")


def test_sweep_keeps_its_training_folders_but_refuses_a_report_before_training(capsys, nnunet_folders, no_training,
                                                                              monkeypatch, three_layer_llama):
    out = nnunet_folders / "out"
    (out / "layer_0").mkdir(parents=True)
    (out / "results").mkdir()
    args = ["sweep-layers", "-d", "4", "-tr", SWEEP_TRAINER, "--llm-source", str(three_layer_llama),
            "--layers", "0", "1", "-o", str(out), "--device", "cpu"]
    monkeypatch.setattr(sweep_layers, "prepare_dataset", reached)
    with pytest.raises(Reached):  # an interrupted sweep resumes
        sweep_layers.main(parse(sweep_layers, args[1:]))
    (out / "report.md").write_text("an earlier sweep")
    monkeypatch.setattr(sweep_layers, "prepare_dataset", must_not_run("dataset preparation"))
    line = cli_error(capsys, *args)
    assert "is not empty (1 entries: report.md)" in line and line.endswith("(fix: -o / --overwrite)")


@pytest.mark.parametrize("saved", [{"layer": 1, "source": "/another/model"}, {"layer": 2, "source": None}])
def test_sweep_refuses_a_layer_folder_trained_with_another_llm(capsys, nnunet_folders, no_training,
                                                              three_layer_llama, saved):
    out = nnunet_folders / "out"
    model = out / "layer_1" / "Dataset004_Hippocampus" / f"{SWEEP_TRAINER}__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    saved = {**saved, "source": saved["source"] or str(three_layer_llama)}
    block = {**asdict(make_spec(LLMChoice("random", source=str(three_layer_llama), layer=1))), **saved}
    (model / "plans.json").write_text(json.dumps({"nnunetv2_llm": block}))
    line = cli_error(capsys, "sweep-layers", "-d", "4", "-tr", SWEEP_TRAINER, "--llm-source", str(three_layer_llama),
                     "--layers", "0", "1", "-o", str(out))
    assert f"{model} was trained with layer {saved['layer']} of {saved['source']}, not the requested layer 1" in line
    assert "Use another -o, or remove" in line and line.endswith("(fix: -o)")


@pytest.mark.parametrize("plans", ['{"nnunetv2_llm": {"layer": 1}}', "{not json"])
def test_sweep_refuses_a_layer_folder_whose_llm_cannot_be_read(capsys, nnunet_folders, no_training,
                                                               three_layer_llama, plans):
    model = nnunet_folders / "out" / "layer_1" / "Dataset004_Hippocampus" / f"{SWEEP_TRAINER}__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(plans)
    line = cli_error(capsys, "sweep-layers", "-d", "4", "-tr", SWEEP_TRAINER, "--llm-source", str(three_layer_llama),
                     "--layers", "0", "1", "-o", str(nnunet_folders / "out"))
    assert f"{model} was trained with layer ? of ?, not the requested layer 1" in line and line.endswith("(fix: -o)")


def test_sweep_accepts_a_layer_folder_trained_with_the_requested_llm(nnunet_folders, monkeypatch, three_layer_llama):
    spec = make_spec(LLMChoice("random", source=str(three_layer_llama), layer=1))
    model = nnunet_folders / "out" / "layer_1" / "Dataset004_Hippocampus" / f"{SWEEP_TRAINER}__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"nnunetv2_llm": asdict(spec)}))
    monkeypatch.setattr(sweep_layers, "prepare_dataset", reached)
    with pytest.raises(Reached):
        sweep_layers.main(parse(sweep_layers, ["-d", "4", "-tr", SWEEP_TRAINER, "--llm-source", str(three_layer_llama),
                                      "--layers", "0", "1", "-o", str(nnunet_folders / "out"), "--device", "cpu"]))


def test_reference_lines_have_the_colour_of_their_class(tmp_path, monkeypatch):
    """Classes whose alphabetical order differs from dataset.json's: each dashed reference line takes the colour
    of its class's points."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    rows = [{"trainer": trainer, "fold": 0, "case": f"c{i}", "label": label, "label_name": name, "dice": dice,
             "nsd": 1.0, "hd95": 0.0, "ref_empty": False, "pred_empty": False, "paired": True}
            for trainer, dice in (("ref", 0.5), (f"{SWEEP_TRAINER}_layer0", 0.6), (f"{SWEEP_TRAINER}_layer1", 0.7))
            for i in range(3) for label, name in ((1, "Zeta"), (2, "Alpha"))]
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(tmp_path / "per_case_metrics.csv", index=False)
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    sweep_layers._plot_dice_per_layer(tmp_path / "per_case_metrics.csv", SWEEP_TRAINER, ["0", "1"], "ref",
                                      tmp_path / "dice_per_layer.png")
    legend = figures[0].axes[0].get_legend()
    colours = {text.get_text(): to_rgb(handle.get_color())
               for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    for name in ("Zeta", "Alpha"):
        assert colours[name] == colours[f"ref ({name})"], colours
    assert colours["Zeta"] != colours["Alpha"]
