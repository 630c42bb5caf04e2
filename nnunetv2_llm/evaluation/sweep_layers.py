"""``nnunetv2_llm sweep-layers``: which LLM layer helps? (LLM4Seg found the choice matters.)

Trains the LLM trainer once per layer index or range of stacked layers (``20:24``; each in its own results folder
``-o/layer_K`` or ``-o/layer_20-24``, since a model folder holds one LLM choice), optionally a reference trainer (e.g.
the no-LLM control) once, then compares all of them with ``compare`` (paired statistics to the first) and plots
validation Dice per layer. Layers are resolved first (``-1`` is the last layer, ``-4:`` the last four), and the
layers, folds and output folder are checked before anything is prepared or trained. ``-o`` keeps its ``layer_K``
training folders between runs (finished folds are skipped, so their stored LLM layer and source must be the requested
ones); a report already in it is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import (
    check_device,
    check_trainer_names,
    check_training_request,
    dataset_folder,
    nnunet_dataset_id,
)
from nnunetv2_llm.evaluation.head_to_head import prepare_dataset, require_nnunet_env, train_all
from nnunetv2_llm.llm.source import ENV_LAYER, ENV_SOURCE

if TYPE_CHECKING:
    from nnunetv2_llm.model.spec import BottleneckSpec

TRAINING_FOLDERS = ("layer_*", "results")  # the sweep's own training state in -o, kept between runs


def layer_tag(layers: str) -> str:
    """A layer index or range as it appears in folder and trainer labels: ``29``, ``20-24`` for ``20:24``."""
    return layers.replace(":", "-")


def layer_label(trainer: str, layers: str) -> str:
    return f"{trainer}_layer{layer_tag(layers)}"


@dataclass(frozen=True)
class _Sweep:
    """One sweep as requested: ``layers`` resolved (``-1``: the last layer), ``output_dir`` absolute, ``env`` the
    nnU-Net folders (and the LLM source) the trainings see."""

    dataset_id: int
    configuration: str
    trainer: str
    layers: list[str]  # resolved, as BottleneckSpec.layer_label gives them: '29' or '20:24'
    folds: list[int]
    output_dir: Path
    reference: str | None
    plans: str
    env: dict[str, str]

    def model_folder(self, trainer: str) -> str:
        """nnU-Net's model folder name of ``trainer`` for this sweep's plans and configuration."""
        from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

        return convert_trainer_plans_config_to_identifier(trainer, self.plans, self.configuration)

    @property
    def labels(self) -> list[str]:
        """The trainers as the report names them, the reference first."""
        return ([self.reference] if self.reference is not None else []) + [layer_label(self.trainer, layer)
                                                                             for layer in self.layers]


def sweep_layers(dataset: str | int, configuration: str, trainer: str, layers: Sequence[int | str],
                 folds: Sequence[int],
                 output_dir: Path, reference: str | None = None, device: str = "cuda", plans: str = "nnUNetPlans",
                 llm_source: str | None = None, overwrite: bool = False) -> Path:
    """Returns the path of the report (report.md, with ``dice_per_layer.png`` beside it)."""
    from nnunetv2_llm.model.spec import LLMChoice, make_spec

    env = require_nnunet_env()
    if llm_source:
        env[ENV_SOURCE] = llm_source
    dataset_id = nnunet_dataset_id(dataset)
    check_trainer_names([trainer])
    if reference is not None:
        check_trainer_names([reference], "--reference")
    check_training_request(dataset_id, configuration, plans, folds, env)
    # source and layer index, from the config (no weights read), as the trainer will see them
    specs = [make_spec(LLMChoice("random", source=llm_source, layer=layer, layer_setting="--layers"))
             for layer in layers]
    sweep = _Sweep(dataset_id, configuration, trainer, [spec.layer_label for spec in specs], list(folds),
                   Path(output_dir).resolve(), reference, plans, env)
    _check_outputs(sweep, specs, overwrite)
    check_device(device)
    prepare_dataset(dataset_id, configuration, plans, env)
    name = dataset_folder(env["nnUNet_raw"], dataset_id).name
    _train_sweep(sweep, name, device)
    _write_sweep_report(sweep, name)
    return sweep.output_dir / "report.md"


def _check_outputs(sweep: _Sweep, specs: Sequence[BottleneckSpec], overwrite: bool) -> None:
    """Distinct layers and folds, a report only replaced with ``--overwrite``, and ``-o/layer_K`` folders trained
    with the requested layers."""
    from nnunetv2_llm.evaluation.compare.checks import check_comparable, check_output_dir

    check_comparable(sweep.labels, sweep.folds, "--layers / --reference")
    check_output_dir(sweep.output_dir, overwrite, keep=TRAINING_FOLDERS)
    for spec in specs:
        _check_trained_layer(sweep.output_dir, sweep.dataset_id, sweep.model_folder(sweep.trainer), spec)


def _train_sweep(sweep: _Sweep, name: str, device: str) -> None:
    """The reference once, the trainer once per layer (each in ``-o/layer_K``), all linked into ``-o/results``:
    one view of every run, for compare."""
    combined = sweep.output_dir / "results" / name
    combined.mkdir(parents=True, exist_ok=True)
    folds = [str(f) for f in sweep.folds]
    if sweep.reference is not None:
        train_all(sweep.dataset_id, sweep.configuration, [sweep.reference], folds, sweep.env, device, sweep.plans)
        _link(Path(sweep.env["nnUNet_results"]) / name / sweep.model_folder(sweep.reference),
              combined / sweep.model_folder(sweep.reference))
    for layer in sweep.layers:
        results = sweep.output_dir / f"layer_{layer_tag(layer)}"
        layer_env = {**sweep.env, ENV_LAYER: layer, "nnUNet_results": str(results)}
        train_all(sweep.dataset_id, sweep.configuration, [sweep.trainer], folds, layer_env, device, sweep.plans)
        _link(results / name / sweep.model_folder(sweep.trainer),
              combined / sweep.model_folder(layer_label(sweep.trainer, layer)))


def _write_sweep_report(sweep: _Sweep, name: str) -> None:
    """compare's report of every run, with the Dice-per-layer figure, staged into ``-o``."""
    from nnunetv2_llm.common.outputs import staged_outputs
    from nnunetv2_llm.evaluation.compare.checks import REPORT_FILES
    from nnunetv2_llm.evaluation.compare.run import write_comparison

    with staged_outputs(sweep.output_dir, REPORT_FILES) as staging:
        report = write_comparison(name, sweep.configuration, sweep.labels, sweep.folds, staging, sweep.plans,
                                  results_root=sweep.output_dir / "results",
                                  preprocessed_root=Path(sweep.env["nnUNet_preprocessed"]))
        _plot_dice_per_layer(staging / "per_case_metrics.csv", sweep.trainer, sweep.layers, sweep.reference,
                             staging / "dice_per_layer.png")
        with report.open("a") as f:
            f.write("\n## Dice per layer\n\n![Dice per layer](dice_per_layer.png)\n")


def _check_trained_layer(output_dir: Path, dataset_id: int, model_folder_name: str, spec: BottleneckSpec) -> None:
    """The sweep skips the finished folds of ``-o/layer_K``: refuse one whose model folder was trained with another
    layer or source (its plans.json's ``nnunetv2_llm`` block), which would be reported under the wrong layer."""
    from nnunetv2_llm.model.spec import PLANS_FILE, BottleneckSpec

    results = dataset_folder(str(output_dir / f"layer_{layer_tag(spec.layer_label)}"), dataset_id)
    folder = results / model_folder_name if results is not None else None
    if folder is None or not (folder / PLANS_FILE).is_file():
        return
    try:
        saved = BottleneckSpec.from_model_folder(folder, required=False)
    except LLMSettingError:  # unreadable or malformed: it cannot show which layer it holds
        saved = None
    layer, source = (saved.layer_label, saved.source) if saved is not None else ("?", "?")
    if (layer, source) != (spec.layer_label, spec.source):
        raise LLMSettingError(
            f"{folder} was trained with layer {layer} of {source}, not the requested layer {spec.layer_label} of "
            f"{spec.source}; its finished folds would be reported as the requested layer. Use another -o, or "
            f"remove {folder}", "-o")


def _link(target: Path, link: Path) -> None:
    if not link.is_symlink():
        os.symlink(target, link, target_is_directory=True)


def _plot_dice_per_layer(csv: Path, trainer: str, layers: Sequence[str], reference: str | None, path: Path) -> None:
    """Mean validation Dice per class against the layer index, with 95% bootstrap intervals of the mean; the
    reference's mean per class as a dashed line of that class's colour."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    df = pd.read_csv(csv)
    df = df[df["paired"]]
    classes = list(df.sort_values("label")["label_name"].unique())  # dataset.json's label order
    colors = dict(zip(classes, sns.color_palette(n_colors=len(classes)), strict=True))
    per_layer = df[df["trainer"].str.startswith(f"{trainer}_layer")].copy()
    per_layer["layer"] = per_layer["trainer"].str.rsplit("_layer", n=1).str[1]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.pointplot(per_layer, x="layer", y="dice", hue="label_name", hue_order=classes, palette=colors,
                  errorbar=("ci", 95), seed=0, ax=ax, order=[layer_tag(layer) for layer in layers], dodge=0.2)
    if reference is not None:
        means = df[df["trainer"] == reference].groupby("label_name")["dice"].mean()
        for label in classes:
            ax.axhline(means[label], ls="--", lw=1, color=colors[label], label=f"{reference} ({label})")
    ax.legend(fontsize="small")
    ax.set(xlabel="LLM layer (index, or START-END range)", ylabel="validation Dice (mean, 95% CI)",
           title=f"{trainer}: Dice per layer")
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerLLM_50epochs",
                        help="an LLM trainer (budget variant), trained once per layer")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="layer indices or START:END ranges of stacked layers, e.g. 0 10 20 29 20:24")
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
