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
import gzip
import json
import math
import os
import re
import struct
import zlib
from pathlib import Path

from nnunetv2_llm.common.errors import LLMSettingError

# The file endings of nnU-Net's image readers (SimpleITK, nibabel, tiff, 2-D natural images, blosc2).
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".bmp", ".b2nd")


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
def file_ending_of(folder: Path, model_folder: Path | None) -> str:
    """The image file ending: the trained dataset's (model folder's dataset.json), else the inputs' own."""
    if model_folder is not None and (model_folder / "dataset.json").is_file():
        try:
            return json.loads((model_folder / "dataset.json").read_text())["file_ending"]
        except (OSError, ValueError, KeyError):
            pass
    names = [p.name for p in folder.iterdir() if p.is_file()]
    for ending in IMAGE_ENDINGS:
        if any(n.endswith(ending) for n in names):
            return ending
    return ".nii.gz"


def nifti_problem(path: Path) -> str | None:
    """Checks SimpleITK does not make for NIfTI-1 files: it reads a half-truncated .nii.gz without complaint
    (missing voxels become zeros), ignores sizeof_hdr and the magic, and turns a zero or NaN pixdim into spacing
    1.0. Here: the gzip stream must be complete, the header consistent, and the voxel data as long as it says."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(352)
            total = len(header)
            while chunk := f.read(1 << 20):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"truncated or corrupt {'gzip stream' if opener is gzip.open else 'file'} ({e})"
    if len(header) < 348:
        return f"file too short for a NIfTI header ({len(header)} bytes)"
    for endian in "<>":
        if struct.unpack(f"{endian}i", header[:4])[0] == 348:
            break
    else:
        if struct.unpack("<i", header[:4])[0] == 540 or struct.unpack(">i", header[:4])[0] == 540:
            return None  # NIfTI-2: left to SimpleITK
        return f"broken NIfTI header: sizeof_hdr is {struct.unpack('<i', header[:4])[0]}, not 348"
    if header[344:348] not in (b"n+1\x00", b"ni1\x00"):
        return f"broken NIfTI header: magic {header[344:348]!r} is not 'n+1' or 'ni1'"
    dim = struct.unpack(f"{endian}8h", header[40:56])
    bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
    pixdim = struct.unpack(f"{endian}8f", header[76:108])
    vox_offset = struct.unpack(f"{endian}f", header[108:112])[0]
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]):
        return f"broken NIfTI header: dim {dim}"
    spatial = pixdim[1:min(dim[0], 3) + 1]
    if any(not math.isfinite(p) or p == 0 for p in spatial):
        return f"broken NIfTI header: voxel spacing (pixdim) {spatial} has zero or non-finite values"
    if header[344:348] == b"n+1\x00" and bitpix > 0 and math.isfinite(vox_offset):
        expected = int(vox_offset) + math.prod(dim[1:dim[0] + 1]) * bitpix // 8
        if total < expected:
            return f"truncated: {total} bytes, the header promises {expected}"
    return None


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a readable image (None when it is): NIfTI files get the checks of ``nifti_problem``;
    then SimpleITK reads the header, the geometry is checked, and the voxels are read."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # e.g. "Analyze file is deprecated" on stderr
    if path.name.endswith((".nii", ".nii.gz")):
        problem = nifti_problem(path)
        if problem:
            return problem

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return f"unreadable header ({_itk_reason(e)})"
    size, spacing = reader.GetSize(), reader.GetSpacing()
    if not size or any(s <= 0 for s in size):
        return f"empty image (size {size})"
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        return f"invalid voxel spacing {spacing} in the header"
    if any(not math.isfinite(v) for v in (*reader.GetOrigin(), *reader.GetDirection())):
        return "non-finite origin or direction in the header"
    try:
        reader.Execute()
    except RuntimeError as e:
        return f"header is fine but the voxel data cannot be read (truncated file?): {_itk_reason(e)}"
    return None


def _itk_reason(error: Exception) -> str:
    """ITK's exception text spans lines with file/line noise: keep its description."""
    text = " ".join(str(error).split())
    match = re.search(r"(?:Description|description):\s*(.*)", text)
    text = match.group(1) if match else text
    return text if len(text) <= 200 else text[:197] + "..."


def check_inputs(folder: Path, ending: str, num_channels: int | None) -> list[Path]:
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
    if output.resolve() == inputs.resolve():
        raise LLMSettingError("the output folder is the input folder; predictions would be mixed with the images",
                              "-o")
    if output.exists() and not output.is_dir():
        raise LLMSettingError(f"output '{output}' exists and is not a folder", "-o")
    check_not_a_dataset_or_model(output)
    existing = sorted(p.name for p in output.glob(f"*{ending}")) if output.is_dir() else []
    if existing and not (overwrite or continue_prediction):
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise LLMSettingError(f"output folder '{output}' already holds {len(existing)} prediction(s) ({shown}); "
                              "pass --overwrite to replace them or --continue_prediction to predict only the "
                              "missing cases", "-o")


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
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunetv2_llm.common.nnunet_commands import dataset_folder, nnunet_dataset_id

    results = os.environ.get("nnUNet_results")
    if not results:
        raise LLMSettingError("nnUNet_results is not set: nnU-Net finds trained models there", "nnUNet_results")
    number = nnunet_dataset_id(dataset)
    dataset_results = dataset_folder(results, number)
    if dataset_results is None:
        raise LLMSettingError(f"no trained dataset {number} in nnUNet_results ({results})", "-d")
    folder = dataset_results / convert_trainer_plans_config_to_identifier(trainer, plans, configuration)
    if not folder.is_dir():
        raise LLMSettingError(f"no trained model at '{folder}'", "-tr / -p / -c")
    if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
        raise LLMSettingError(f"model folder '{folder}' lacks plans.json or dataset.json", "-tr / -p / -c")
    return folder


def check_model(folder: Path, folds: list[str], checkpoint_name: str) -> None:
    """Each fold's checkpoint exists, is safely readable, and fits the plans' LLM block."""
    from nnunetv2_llm.model.spec import FROZEN_PREFIX, PLANS_KEY, BottleneckSpec, frozen_layer_sha256
    from nnunetv2_llm.trainers.reliability import CheckpointUnreadable, load_checkpoint_file

    try:
        plans = json.loads((folder / "plans.json").read_text())
    except (OSError, ValueError) as e:
        raise LLMSettingError(f"'{folder / 'plans.json'}' is unreadable ({e})", "the model folder's plans.json") from None
    spec = BottleneckSpec.from_plans(plans) if PLANS_KEY in plans else None
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
        if spec is None:
            continue
        weights = checkpoint["network_weights"]
        proj = weights.get("bottleneck.proj_in.up.weight")
        if proj is None:
            raise LLMSettingError(f"'{path}' has no LLM bottleneck block, but plans.json describes one",
                                  "the model folder's plans.json")
        if proj.shape[0] != spec.width:
            raise LLMSettingError(f"'{path}' was trained with an LLM of hidden size {proj.shape[0]}, the model folder's "
                                  f"plans.json describes hidden size {spec.width} (plans.json from another model?)",
                                  "the model folder's plans.json")
        if spec.mixer == "pretrained" and spec.layer_sha256:
            found = frozen_layer_sha256(weights, spec.dtype, FROZEN_PREFIX)
            if found != spec.layer_sha256:
                raise LLMSettingError(f"the frozen LLM layer in '{path}' differs from the one plans.json describes "
                                      f"(sha256 {found[:12]} vs {spec.layer_sha256[:12]}): the checkpoint or plans.json "
                                      "comes from another model", "the model folder's plans.json")


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
    ending = file_ending_of(inputs, model)
    num_channels = None
    if model is not None:
        try:
            num_channels = len(json.loads((model / "dataset.json").read_text())["channel_names"])
        except (OSError, ValueError, KeyError, TypeError):
            num_channels = None
    images = check_inputs(inputs, ending, num_channels)
    check_output(output, inputs, ending, args.overwrite, args.continue_prediction)
    if model_error is not None:
        raise model_error
    check_model(model, [str(f) for f in args.f], args.chk)
    print(f"nnunetv2_llm predict: {len(images)} input image(s) and {len(args.f)} fold checkpoint(s) checked",
          flush=True)
    # the resolved folder name: nnU-Net takes any 'Dataset...' text (Dataset004, a typo) as a literal folder name
    command = ["nnUNetv2_predict", "-i", str(inputs), "-o", str(output), "-d", model.parent.name, "-c", args.c,
               "-f", *[str(f) for f in args.f], "-tr", args.tr, "-p", args.p, "-chk", args.chk, "-device", args.device]
    if args.npp is not None:
        command += ["-npp", str(args.npp)]
    if args.nps is not None:
        command += ["-nps", str(args.nps)]
    if args.step_size is not None:
        command += ["-step_size", str(args.step_size)]
    if args.prev_stage_predictions is not None:
        command += ["-prev_stage_predictions", str(Path(args.prev_stage_predictions).expanduser())]
    if args.num_parts != 1:
        command += ["-num_parts", str(args.num_parts), "-part_id", str(args.part_id)]
    if args.disable_tta:
        command.append("--disable_tta")
    if args.disable_progress_bar:
        command.append("--disable_progress_bar")
    if args.save_probabilities:
        command.append("--save_probabilities")
    if args.continue_prediction:
        command.append("--continue_prediction")
    run(command, nnunet_env())
    return 0


def main(args: argparse.Namespace) -> int:
    return predict(args)
