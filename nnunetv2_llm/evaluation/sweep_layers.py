"""``nnunetv2_llm sweep-layers``: which LLM layer helps? (LLM4Seg found the choice matters.)

Trains the LLM trainer once per layer index (each layer in its own results folder ``-o/layer_K``, since a model
folder holds one LLM choice), optionally a reference trainer (e.g. the no-LLM control) once, then compares all of
them with ``compare`` (paired statistics to the first) and plots validation Dice per layer. Layer indices are
resolved first (``-1`` is the last layer), and the layers, folds and output folder are checked before anything is
prepared or trained. ``-o`` keeps its ``layer_K`` training folders between runs (finished folds are skipped, so
their stored LLM layer and source must be the requested ones); a report already in it is replaced only with
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.evaluation.head_to_head import prepare_dataset, require_nnunet_env, train_all
from nnunetv2_llm.llm.source import ENV_LAYER, ENV_SOURCE
from nnunetv2_llm.common.nnunet_commands import (
    check_device, check_trainer_names, check_training_request, dataset_folder, nnunet_dataset_id,
)

if TYPE_CHECKING:
    from nnunetv2_llm.model.spec import BottleneckSpec

TRAINING_FOLDERS = ("layer_*", "results")  # the sweep's own training state in -o, kept between runs


def layer_label(trainer: str, layer: int) -> str:
    return f"{trainer}_layer{layer}"


def sweep_layers(dataset: str | int, configuration: str, trainer: str, layers: Sequence[int], folds: Sequence[int],
                 output_dir: Path, reference: str | None = None, device: str = "cuda", plans: str = "nnUNetPlans",
                 llm_source: str | None = None, overwrite: bool = False) -> Path:
    """Returns the path of the report (report.md, with ``dice_per_layer.png`` beside it)."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier as folder_name

    from nnunetv2_llm.evaluation.compare import check_comparable, check_output_dir, staged_outputs, write_comparison
    from nnunetv2_llm.model.spec import make_spec

    env = require_nnunet_env()
    if llm_source:
        env[ENV_SOURCE] = llm_source
    dataset_id = nnunet_dataset_id(dataset)
    check_trainer_names([trainer])
    if reference is not None:
        check_trainer_names([reference], "--reference")
    check_training_request(dataset_id, configuration, plans, folds, env)
    # source and layer index, from the config (no weights read), as the trainer will see them
    specs = [make_spec("random", source=llm_source, layer=layer, layer_setting="--layers") for layer in layers]
    layers = [spec.layer for spec in specs]
    labels = ([reference] if reference is not None else []) + [layer_label(trainer, layer) for layer in layers]
    check_comparable(labels, folds, "--layers / --reference")
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite, keep=TRAINING_FOLDERS)
    for spec in specs:
        _check_trained_layer(output_dir, dataset_id, folder_name(trainer, plans, configuration), spec)
    check_device(device)
    prepare_dataset(dataset_id, configuration, plans, env)
    name = dataset_folder(env["nnUNet_raw"], dataset_id).name
    combined = output_dir / "results" / name  # one view of every run, for compare
    combined.mkdir(parents=True, exist_ok=True)
    folds = [str(f) for f in folds]
    if reference is not None:
        train_all(dataset_id, configuration, [reference], folds, env, device, plans)
        _link(Path(env["nnUNet_results"]) / name / folder_name(reference, plans, configuration),
              combined / folder_name(reference, plans, configuration))
    for layer in layers:
        layer_env = {**env, ENV_LAYER: str(layer), "nnUNet_results": str(output_dir / f"layer_{layer}")}
        train_all(dataset_id, configuration, [trainer], folds, layer_env, device, plans)
        _link(output_dir / f"layer_{layer}" / name / folder_name(trainer, plans, configuration),
              combined / folder_name(layer_label(trainer, layer), plans, configuration))
    with staged_outputs(output_dir) as staging:
        report = write_comparison(name, configuration, labels, [int(f) for f in folds], staging, plans,
                                  results_root=output_dir / "results",
                                  preprocessed_root=Path(env["nnUNet_preprocessed"]))
        _plot_dice_per_layer(staging / "per_case_metrics.csv", trainer, layers, reference,
                             staging / "dice_per_layer.png")
        with report.open("a") as f:
            f.write("\n## Dice per layer\n\n![Dice per layer](dice_per_layer.png)\n")
    return output_dir / "report.md"


def _check_trained_layer(output_dir: Path, dataset_id: int, model_folder_name: str, spec: BottleneckSpec) -> None:
    """The sweep skips the finished folds of ``-o/layer_K``: refuse one whose model folder was trained with another
    layer or source (its plans.json's ``nnunetv2_llm`` block), which would be reported under the wrong layer."""
    from nnunetv2_llm.model.spec import PLANS_KEY

    results = dataset_folder(str(output_dir / f"layer_{spec.layer}"), dataset_id)
    plans_file = results / model_folder_name / "plans.json" if results is not None else None
    if plans_file is None or not plans_file.is_file():
        return
    try:
        saved = json.loads(plans_file.read_text()).get(PLANS_KEY) or {}
    except (OSError, ValueError, AttributeError):
        saved = {}
    if (saved.get("layer"), saved.get("source")) != (spec.layer, spec.source):
        raise LLMSettingError(
            f"{plans_file.parent} was trained with layer {saved.get('layer', '?')} of {saved.get('source', '?')}, "
            f"not the requested layer {spec.layer} of {spec.source}; its finished folds would be reported as the "
            f"requested layer. Use another -o, or remove {plans_file.parent}", "-o")


def _link(target: Path, link: Path) -> None:
    if not link.is_symlink():
        os.symlink(target, link, target_is_directory=True)


def _plot_dice_per_layer(csv: Path, trainer: str, layers: Sequence[int], reference: str | None, path: Path) -> None:
    """Mean validation Dice per class against the layer index, with 95% bootstrap intervals of the mean; the
    reference's mean per class as a dashed line of that class's colour."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    df = pd.read_csv(csv)
    df = df[df["paired"]]
    classes = list(df.sort_values("label")["label_name"].unique())  # dataset.json's label order
    colors = dict(zip(classes, sns.color_palette(n_colors=len(classes))))
    per_layer = df[df["trainer"].str.startswith(f"{trainer}_layer")].copy()
    per_layer["layer"] = per_layer["trainer"].str.rsplit("_layer", n=1).str[1].astype(int)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.pointplot(per_layer, x="layer", y="dice", hue="label_name", hue_order=classes, palette=colors,
                  errorbar=("ci", 95), seed=0, ax=ax, order=sorted(layers), dodge=0.2)
    if reference is not None:
        means = df[df["trainer"] == reference].groupby("label_name")["dice"].mean()
        for label in classes:
            ax.axhline(means[label], ls="--", lw=1, color=colors[label], label=f"{reference} ({label})")
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
    parser.add_argument("-o", "--output-dir", type=Path, required=True,
                        help="holds the per-layer training (layer_K, kept between runs) and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))


def main(args: argparse.Namespace) -> int:
    report = sweep_layers(args.dataset, args.configuration, args.trainer, args.layers, args.folds,
                          args.output_dir, args.reference, args.device, args.plans, args.llm_source, args.overwrite)
    print(f"report: {report}")
    return 0
