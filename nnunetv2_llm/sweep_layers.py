"""``nnunetv2_llm sweep-layers``: which LLM layer helps? (LLM4Seg found the choice matters.)

Trains the LLM trainer once per layer index (each layer in its own results folder, since a model folder
holds one LLM choice), optionally a reference trainer (e.g. the no-LLM control) once, then compares all of
them with ``compare`` (paired statistics to the first) and plots validation Dice per layer.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from nnunetv2_llm.errors import LLMSettingError
from nnunetv2_llm.head_to_head import prepare_dataset, require_nnunet_env, train_all
from nnunetv2_llm.llm_source import ENV_LAYER, ENV_SOURCE
from nnunetv2_llm.nnunet_commands import check_trainer_names, dataset_folder, nnunet_dataset_id


def layer_label(trainer: str, layer: int) -> str:
    return f"{trainer}_layer{layer}"


def sweep_layers(dataset: str | int, configuration: str, trainer: str, layers: Sequence[int], folds: Sequence[int],
                 output_dir: Path, reference: str | None = None, device: str = "cuda", plans: str = "nnUNetPlans",
                 llm_source: str | None = None) -> Path:
    """Returns the path of the report (report.md, with ``dice_per_layer.png`` beside it)."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier as folder_name

    from nnunetv2_llm.compare import compare
    from nnunetv2_llm.spec import make_spec

    if len(layers) + (reference is not None) < 2:
        raise LLMSettingError("give at least two layers, or one layer and --reference", "--layers")
    env = require_nnunet_env()
    if llm_source:
        env[ENV_SOURCE] = llm_source
    dataset_id = nnunet_dataset_id(dataset)
    check_trainer_names([trainer])
    if reference is not None:
        check_trainer_names([reference], "--reference")
    for layer in layers:  # source and layer index, from the config (no weights read), as the trainer will see them
        make_spec("random", source=llm_source, layer=layer, layer_setting="--layers")
    prepare_dataset(dataset_id, configuration, plans, env)
    name = dataset_folder(env["nnUNet_raw"], dataset_id).name
    output_dir = Path(output_dir).resolve()
    combined = output_dir / "results" / name  # one view of every run, for compare
    combined.mkdir(parents=True, exist_ok=True)
    folds = [str(f) for f in folds]
    labels = []
    if reference is not None:
        train_all(dataset_id, configuration, [reference], folds, env, device, plans)
        _link(Path(env["nnUNet_results"]) / name / folder_name(reference, plans, configuration),
              combined / folder_name(reference, plans, configuration))
        labels.append(reference)
    for layer in layers:
        layer_env = {**env, ENV_LAYER: str(layer), "nnUNet_results": str(output_dir / f"layer_{layer}")}
        train_all(dataset_id, configuration, [trainer], folds, layer_env, device, plans)
        _link(output_dir / f"layer_{layer}" / name / folder_name(trainer, plans, configuration),
              combined / folder_name(layer_label(trainer, layer), plans, configuration))
        labels.append(layer_label(trainer, layer))
    report = compare(name, configuration, labels, [int(f) for f in folds], output_dir, plans,
                     results_root=output_dir / "results", preprocessed_root=Path(env["nnUNet_preprocessed"]))
    _plot_dice_per_layer(output_dir / "per_case_metrics.csv", trainer, layers, reference,
                         output_dir / "dice_per_layer.png")
    with report.open("a") as f:
        f.write("\n## Dice per layer\n\n![Dice per layer](dice_per_layer.png)\n")
    return report


def _link(target: Path, link: Path) -> None:
    if not link.is_symlink():
        os.symlink(target, link, target_is_directory=True)


def _plot_dice_per_layer(csv: Path, trainer: str, layers: Sequence[int], reference: str | None, path: Path) -> None:
    """Mean validation Dice per class against the layer index, with 95% bootstrap intervals of the mean."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    df = pd.read_csv(csv)
    df = df[df["paired"]]
    per_layer = df[df["trainer"].str.startswith(f"{trainer}_layer")].copy()
    per_layer["layer"] = per_layer["trainer"].str.rsplit("_layer", n=1).str[1].astype(int)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.pointplot(per_layer, x="layer", y="dice", hue="label_name", errorbar=("ci", 95), seed=0, ax=ax,
                  order=sorted(layers), dodge=0.2)
    if reference is not None:
        for (label, group), color in zip(df[df["trainer"] == reference].groupby("label_name"), sns.color_palette()):
            ax.axhline(group["dice"].mean(), ls="--", lw=1, color=color, label=f"{reference} ({label})")
    ax.legend(fontsize="small")
    ax.set(xlabel="LLM layer index", ylabel="validation Dice (mean, 95% CI)", title=f"{trainer}: Dice per layer")
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerLLM_50epochs",
                        help="an LLM trainer (budget variant), trained once per layer")
    parser.add_argument("--layers", nargs="+", type=int, required=True, help="layer indices, e.g. 0 10 20 29")
    parser.add_argument("--reference", help="a trainer trained once and shown as the baseline, e.g. "
                                            "nnUNetTrainerLLMNoLLM_50epochs")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--llm-source", help=f"LLM source (default: ${ENV_SOURCE} or the embedded SmolLM2)")
    parser.add_argument("-o", "--output-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))


def main(args: argparse.Namespace) -> int:
    report = sweep_layers(args.dataset, args.configuration, args.trainer, args.layers, args.folds,
                          args.output_dir, args.reference, args.device, args.plans, args.llm_source)
    print(f"report: {report}")
    return 0
