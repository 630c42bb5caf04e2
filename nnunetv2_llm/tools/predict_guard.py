"""``nnunetv2_llm predict``: ``nnUNetv2_predict`` with its inputs and model checked first, and no silent overwrite.

Takes nnUNetv2_predict's arguments (-i -o -d -c -f -tr -p -chk -device ...). Before nnU-Net starts:
the device must be available; every input image is opened with SimpleITK (header, then data), so a broken or
truncated file is named in one line instead of failing in a worker process; an output folder that already holds
predictions is refused unless ``--overwrite`` or ``--continue_prediction`` (only the missing cases) is given, and
a model or dataset folder always; the model folder (``-d`` resolved to its ``DatasetXXX_Name``), each fold's
checkpoint and, for nnunetv2_llm trainers, the frozen LLM layer in each checkpoint are checked against the
model folder's plans.json. Checkpoints are read here with ``torch.load(weights_only=True)``: a checkpoint that
would need arbitrary unpickling is refused before nnU-Net (which unpickles fully) sees it.
Exit codes: 0 done, 2 bad input or settings (one line on stderr), 1 nnUNetv2_predict failed.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.dataset_checks import load_dataset_json
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.images import IMAGE_ENDINGS, check_image

if TYPE_CHECKING:  # torch is imported where it is used: the command line starts without it
    import torch

    from nnunetv2_llm.model.spec import BottleneckSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, ... as for nnUNetv2_predict)")
    parser.add_argument("-o", required=True, help="output folder; refused when it already holds predictions, "
                                                  "unless --overwrite or --continue_prediction")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default: 0 1 2 3 4)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer class (default: nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="default: cuda")
    parser.add_argument("-npp", type=int, default=None, help="preprocessing processes (nnUNetv2_predict's -npp)")
    parser.add_argument("-nps", type=int, default=None, help="export processes (nnUNetv2_predict's -nps)")
    parser.add_argument("-step_size", type=float, default=None,
                        help="sliding-window step as a fraction of the patch, 0 < s <= 1 (nnU-Net's default 0.5)")
    parser.add_argument("-prev_stage_predictions", default=None,
                        help="folder with the previous stage's predictions (3d_cascade_fullres)")
    parser.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts (default 1)")
    parser.add_argument("-part_id", type=int, default=0, help="which part this call predicts, 0 .. num_parts-1")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    parser.add_argument("--save_probabilities", action="store_true", help="also export probabilities")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace predictions already in the output folder")
    group.add_argument("--continue_prediction", action="store_true",
                       help="keep predictions already in the output folder and predict only the missing cases")


# ----------------------------------------------------------------------------------------------------- inputs
def trained_dataset_json(model_folder: Path | None) -> dict:
    """The model folder's dataset.json (the trained dataset's); empty when there is no readable one, so that the
    input checks fall back to what the inputs show and the model's own error comes after them."""
    if model_folder is None or not (model_folder / "dataset.json").is_file():
        return {}
    try:
        return load_dataset_json(model_folder)
    except LLMSettingError:
        return {}


def file_ending_of(folder: Path, dataset_json: dict) -> str:
    """The image file ending: the trained dataset's (``dataset_json``), else the inputs' own."""
    if "file_ending" in dataset_json:
        return dataset_json["file_ending"]
    names = [p.name for p in folder.iterdir() if p.is_file()]
    for ending in IMAGE_ENDINGS:
        if any(n.endswith(ending) for n in names):
            return ending
    return ".nii.gz"


def check_inputs(folder: Path, ending: str, num_channels: int | None) -> list[Path]:
    """The input images, after checking their names (``CASE_XXXX<ending>``), each case's channels (when the model's
    count is known) and that every image reads in full."""
    if not folder.is_dir():
        raise LLMSettingError(f"input folder '{folder}' does not exist", "-i")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ending))
    if not images:
        raise LLMSettingError(f"input folder '{folder}' holds no *{ending} images", "-i")
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    cases: dict[str, set[int]] = {}
    for image in images:
        match = pattern.match(image.name)
        if not match:
            raise LLMSettingError(f"input image '{image}' is not named CASE_XXXX{ending} (XXXX: channel, 0000 "
                                  "for single-channel data) as nnU-Net expects", "-i")
        cases.setdefault(match.group(1), set()).add(int(match.group(2)))
    if num_channels is not None:
        for case, channels in sorted(cases.items()):
            if channels != set(range(num_channels)):
                raise LLMSettingError(f"case '{case}' in '{folder}' has channels {sorted(channels)}, the model expects "
                                      f"{list(range(num_channels))}", "-i")
    for image in images:
        problem = check_image(image)
        if problem:
            raise LLMSettingError(f"input image '{image}' cannot be used: {problem}", "-i")
    return images


def check_output(output: Path, inputs: Path, ending: str, overwrite: bool, continue_prediction: bool) -> None:
    """Refuse the input folder, a model or dataset folder, a path under a file, and earlier predictions unless
    ``--overwrite`` or ``--continue_prediction``."""
    from nnunetv2_llm.common.outputs import OutputRule, check_output_folder

    if output.resolve() == inputs.resolve():
        raise LLMSettingError("the output folder is the input folder; predictions would be mixed with the images",
                              "-o")
    check_not_a_dataset_or_model(output)
    check_output_folder(output, overwrite or continue_prediction, OutputRule(
        what="predictions", setting="-o", outputs=(f"*{ending}",), refusal_setting="-o",
        refusal="output folder '{folder}' already holds {count} prediction(s) ({shown}); pass --overwrite to "
                "replace them or --continue_prediction to predict only the missing cases"))


def check_not_a_dataset_or_model(output: Path) -> None:
    """nnUNetv2_predict also writes dataset.json, plans.json and predict_from_raw_data_args.json into the output
    folder: one holding the first two without the third is a model or dataset folder, never overwritten."""
    if (output / "predict_from_raw_data_args.json").is_file():
        return
    found = [name for name in ("dataset.json", "plans.json") if (output / name).is_file()]
    if found:
        raise LLMSettingError(f"output folder '{output}' holds {' and '.join(found)} but is no earlier prediction "
                              "(no predict_from_raw_data_args.json): it looks like a model or dataset folder, whose "
                              "files nnUNetv2_predict would replace; choose a new or empty output folder", "-o")


# ------------------------------------------------------------------------------------------------------ model
def model_folder_of(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """The trained model's folder under ``$nnUNet_results``, holding plans.json and dataset.json."""
    from nnunetv2_llm.common.nnunet_commands import nnunet_dataset_id, trainer_folder

    results = os.environ.get("nnUNet_results")
    if not results:
        raise LLMSettingError("nnUNet_results is not set: nnU-Net finds trained models there", "nnUNet_results")
    number = nnunet_dataset_id(dataset)
    folder = trainer_folder(results, number, trainer, plans, configuration)
    if folder is None:
        raise LLMSettingError(f"no trained dataset {number} in nnUNet_results ({results})", "-d")
    if not folder.is_dir():
        raise LLMSettingError(f"no trained model at '{folder}'", "-tr / -p / -c")
    if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
        raise LLMSettingError(f"model folder '{folder}' lacks plans.json or dataset.json", "-tr / -p / -c")
    return folder


def check_model(folder: Path, folds: list[str], checkpoint_name: str) -> None:
    """Each fold's checkpoint exists, is safely readable, and fits the plans' LLM block."""
    from nnunetv2_llm.model.spec import BottleneckSpec
    from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable, load_checkpoint_file

    spec = BottleneckSpec.from_model_folder(folder, required=False)
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            raise LLMSettingError(f"fold {fold} has no {checkpoint_name} in '{folder}' (not trained, or not finished)",
                                  "-f / -chk")
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointUnreadable as e:
            raise LLMSettingError(f"checkpoint '{path}' cannot be used: {e.reason}",
                                  "nnUNet_LLM_ALLOW_PICKLE" if e.security else "-chk") from None
        if spec is not None:
            check_checkpoint_fits(path, checkpoint["network_weights"], spec)


def check_checkpoint_fits(path: Path, weights: dict[str, torch.Tensor], spec: BottleneckSpec) -> None:
    """The checkpoint's network weights (``weights``, read from ``path``) hold the LLM block that ``spec`` (the
    model folder's plans.json) describes: the same LLM width and the same frozen layer."""
    from nnunetv2_llm.model.spec import frozen_layer_differs

    where = "the model folder's plans.json"
    proj = weights.get("bottleneck.proj_in.up.weight")  # (width, rank): its rows are the LLM's hidden size
    if proj is None:
        raise LLMSettingError(f"'{path}' has no LLM bottleneck block, but plans.json describes one", where)
    if proj.shape[0] != spec.width:
        raise LLMSettingError(f"'{path}' was trained with an LLM of hidden size {proj.shape[0]}, the model folder's "
                              f"plans.json describes hidden size {spec.width} (plans.json from another model?)", where)
    found = frozen_layer_differs(weights, spec)
    if found is not None:
        raise LLMSettingError(f"the frozen LLM layer in '{path}' differs from the one plans.json describes "
                              f"(sha256 {found[:12]} vs {spec.layer_sha256[:12]}): the checkpoint or plans.json "
                              "comes from another model", where)


# ------------------------------------------------------------------------------------------------------- main
def check_run_options(args: argparse.Namespace) -> None:
    """Device, step size, parts and the cascade's previous-stage folder, before nnU-Net starts."""
    from nnunetv2_llm.common.nnunet_commands import check_device

    check_device(args.device, "-device")
    if args.step_size is not None and not 0 < args.step_size <= 1:
        raise LLMSettingError(f"-step_size {args.step_size} must be in (0, 1]", "-step_size")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise LLMSettingError(f"-part_id {args.part_id} must be in 0 .. num_parts-1 (num_parts {args.num_parts})",
                              "-num_parts / -part_id")
    if args.prev_stage_predictions is not None and not Path(args.prev_stage_predictions).expanduser().is_dir():
        raise LLMSettingError(f"previous-stage predictions folder '{args.prev_stage_predictions}' does not exist",
                              "-prev_stage_predictions")


def predict(args: argparse.Namespace) -> int:
    """Check the run options, the inputs, the output folder and the model, in that order, then run
    nnUNetv2_predict; a missing model is reported after the input and output checks."""
    from nnunetv2_llm.common.environment import nnunet_env
    from nnunetv2_llm.common.nnunet_commands import run

    check_run_options(args)
    inputs, output = Path(args.i).expanduser(), Path(args.o).expanduser()
    try:
        model = model_folder_of(str(args.d), args.tr, args.p, args.c)
        model_error = None
    except LLMSettingError as e:
        model, model_error = None, e
    if not inputs.is_dir():
        raise LLMSettingError(f"input folder '{inputs}' does not exist", "-i")
    dataset_json = trained_dataset_json(model)
    ending = file_ending_of(inputs, dataset_json)
    images = check_inputs(inputs, ending, channel_count(dataset_json))
    check_output(output, inputs, ending, args.overwrite, args.continue_prediction)
    if model_error is not None:
        raise model_error
    check_model(model, [str(f) for f in args.f], args.chk)
    print(f"nnunetv2_llm predict: {len(images)} input image(s) and {len(args.f)} fold checkpoint(s) checked",
          flush=True)
    run(nnunet_predict_command(args, inputs, output, model.parent.name), nnunet_env())
    return 0


def channel_count(dataset_json: dict) -> int | None:
    """How many channels the trained dataset has; None when its dataset.json does not say."""
    try:
        return len(dataset_json["channel_names"])
    except (KeyError, TypeError):
        return None


def nnunet_predict_command(args: argparse.Namespace, inputs: Path, output: Path, dataset_name: str) -> list[str]:
    """nnUNetv2_predict's command line for ``args``, with the dataset folder's real name (nnU-Net takes any
    'Dataset...' text, such as Dataset004 or a typo, as a literal folder name)."""
    command = ["nnUNetv2_predict", "-i", str(inputs), "-o", str(output), "-d", dataset_name, "-c", args.c,
               "-f", *[str(f) for f in args.f], "-tr", args.tr, "-p", args.p, "-chk", args.chk, "-device", args.device]
    for flag, value in (("-npp", args.npp), ("-nps", args.nps), ("-step_size", args.step_size)):
        if value is not None:
            command += [flag, str(value)]
    if args.prev_stage_predictions is not None:
        command += ["-prev_stage_predictions", str(Path(args.prev_stage_predictions).expanduser())]
    if args.num_parts != 1:
        command += ["-num_parts", str(args.num_parts), "-part_id", str(args.part_id)]
    switches = ("disable_tta", "disable_progress_bar", "save_probabilities", "continue_prediction")
    return command + [f"--{name}" for name in switches if getattr(args, name)]


def main(args: argparse.Namespace) -> int:
    return predict(args)
