"""The bottleneck features before and after the LLM block, captured on one case.

The model is loaded by nnU-Net itself (``nnUNetPredictor.initialize_from_trained_model_folder``: the trainer's
``build_network_architecture`` and the checkpoint's weights) and the case is preprocessed by the model's own
preprocessor (transpose, crop to non-zero, resample, normalise), so the network sees exactly what
``nnUNetv2_predict`` feeds it. One patch (the configuration's patch size, centred on the chosen slice; or the
whole image) goes through the network once; a forward hook on the bottleneck block captures its input x and
output y = x + delta, shape (C, *bottleneck). Each is reduced over channels per voxel (mean |a| or L2 norm) and
upsampled to the patch; the change map is the reduction of y - x. Everything is in the network's input space.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_llm.common.dataset_checks import load_dataset_json
from nnunetv2_llm.common.errors import LLMSettingError

if TYPE_CHECKING:  # torch and nnU-Net are imported where they are used: the command line starts without them
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunetv2_llm.model.block import LLMBottleneckBlock
    from nnunetv2_llm.model.spec import BottleneckSpec

REDUCTIONS = ("mean-abs", "l2")
REGIONS = ("patch", "whole")


@dataclass
class ActivationMaps:
    """What one run captured. Volumes are in the preprocessed (network input) space, axes as nnU-Net orders them
    after ``transpose_forward``; the 2-D maps are the chosen slice, NaN outside the analysed window."""

    before: np.ndarray  # (C, *bottleneck) input of the bottleneck block
    after: np.ndarray  # (C, *bottleneck) its output
    image_slice: np.ndarray  # (H, W) channel ``channel`` of the preprocessed image at the slice
    maps: dict[str, np.ndarray]  # 'before' / 'after' / 'change' -> (H, W)
    segmentation_slice: np.ndarray  # (H, W) the network's predicted labels inside the window, 0 outside
    window: list[tuple[int, int]]  # [start, stop) per preprocessed axis that went through the network
    slice_axis: int  # preprocessed axis
    slice_index: int  # preprocessed index
    original_slice: tuple[int, int]  # (axis, index) in the input file's array as nnU-Net reads it
    meta: dict = field(default_factory=dict)

    @property
    def relative_change(self) -> float:
        """||after - before|| / ||before|| over the whole captured bottleneck tensor."""
        denom = float(np.linalg.norm(self.before))
        return float(np.linalg.norm(self.after - self.before)) / denom if denom > 0 else float("nan")


# ----------------------------------------------------------------------------------------------- model loading

def check_model_folder(model_folder: Path, fold: str, checkpoint: str) -> BottleneckSpec:
    """The LLM block settings of a trained nnunetv2_llm model folder, after checking the folder, its dataset.json
    and the fold's checkpoint exist."""
    from nnunetv2_llm.model.spec import PLANS_FILE, PLANS_KEY, BottleneckSpec

    if not model_folder.is_dir():
        raise LLMSettingError(f"model folder {model_folder} does not exist", "-m")
    for name in (PLANS_FILE, "dataset.json"):
        if not (model_folder / name).is_file():
            raise LLMSettingError(f"{model_folder} has no {name}: -m must be the trainer folder "
                                  "(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)", "-m")
    checkpoint_path = model_folder / f"fold_{fold}" / checkpoint
    if not checkpoint_path.is_file():
        found = sorted(str(p.relative_to(model_folder)) for p in model_folder.glob("fold_*/*.pth"))
        raise LLMSettingError(f"no checkpoint {checkpoint_path}; available: {found or 'none'}", "-f / -chk")
    spec = BottleneckSpec.from_model_folder(model_folder, required=False)
    if spec is None:
        raise LLMSettingError(
            f"{model_folder} was not trained with an nnunetv2_llm trainer: its plans.json has no "
            f'"{PLANS_KEY}" block, so there is no LLM block to look at', "-m")
    return spec


def load_predictor(model_folder: str | os.PathLike, fold: str = "0", checkpoint: str = "checkpoint_final.pth",
                   device: str = "cpu") -> nnUNetPredictor:
    """nnU-Net's predictor for the model folder (network rebuilt by the trainer class, checkpoint loaded)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model_folder = Path(model_folder).expanduser().resolve()
    check_model_folder(model_folder, fold, checkpoint)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise LLMSettingError("--device cuda was asked for but no CUDA device is available", "--device")
    chatter = io.StringIO()
    try:
        with _our_trainers_findable(), contextlib.redirect_stdout(chatter):
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=torch_device.type == "cuda",
                                        device=torch_device, verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                           checkpoint_name=checkpoint)
    except BaseException:
        sys.stderr.write(chatter.getvalue())  # nnU-Net's own account of what failed
        raise
    bottleneck_of(predictor.network)
    return predictor


@contextlib.contextmanager
def _our_trainers_findable() -> Iterator[None]:
    """nnU-Net finds the trainer class by name through nnUNet_extTrainer: this package's trainers folder is added
    for the block, and the variable restored afterwards."""
    from nnunetv2_llm.common.environment import ext_trainer_value

    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous


def bottleneck_of(network: torch.nn.Module) -> LLMBottleneckBlock:
    """The LLMBottleneckBlock of a (possibly torch.compile'd) network."""
    from nnunetv2_llm.model.block import LLMBottleneckBlock
    from nnunetv2_llm.model.network import unwrap_network

    network = unwrap_network(network)
    block = getattr(network, "bottleneck", None)
    if not isinstance(block, LLMBottleneckBlock):
        raise LLMSettingError(f"the network ({type(network).__name__}) has no LLM bottleneck block", "-m")
    return block


def capture_bottleneck(network: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``network`` on x (B, C, *patch) once; returns the block's input (B, C', *bottleneck), its output (same
    shape) and the logits (B, classes, *patch), all on CPU float32."""
    import torch

    captured = {}

    def hook(module, inputs, output):
        captured["before"] = inputs[0].detach().float().cpu()
        captured["after"] = output.detach().float().cpu()

    handle = bottleneck_of(network).register_forward_hook(hook)
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=x.device.type == "cuda"):
            logits = network(x)
    finally:
        handle.remove()
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return captured["before"], captured["after"], logits.detach().float().cpu()


def reduce_channels(a: np.ndarray, how: str) -> np.ndarray:
    """(C, *s) -> (*s): mean |a| over channels, or the L2 norm of the channel vector."""
    if how == "mean-abs":
        return np.abs(a).mean(axis=0)
    if how == "l2":
        return np.sqrt((a.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    raise ValueError(f"reduction must be one of {REDUCTIONS}")


# ----------------------------------------------------------------------------------------------- geometry

def _case_name(image_file: Path, file_ending: str) -> str:
    name = image_file.name
    stem = name[: -len(file_ending)] if name.endswith(file_ending) else name.split(".")[0]
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def resolve_images(images: list[str], dataset_json: dict) -> list[Path]:
    """The case's files in channel order. One ``CASE_0000<ending>`` file finds its sibling channels."""
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    ending = dataset_json.get("file_ending", ".nii.gz")
    paths = [Path(p).expanduser() for p in images]
    for p in paths:
        if not p.is_file():
            raise LLMSettingError(f"input image {p} does not exist", "-i")
    if len(paths) == 1 and n_channels > 1 and paths[0].name.endswith(f"_0000{ending}"):
        base = paths[0].name[: -len(f"_0000{ending}")]
        paths = [paths[0].with_name(f"{base}_{c:04d}{ending}") for c in range(n_channels)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise LLMSettingError(f"the model takes {n_channels} channels; missing {missing}", "-i")
    if len(paths) != n_channels:
        raise LLMSettingError(f"the model takes {n_channels} channel(s) "
                              f"({dataset_json.get('channel_names')}), {len(paths)} image file(s) given", "-i")
    return paths


def to_preprocessed_index(index: int, axis_t: int, properties: dict, new_len: int) -> int:
    """A slice index of the input file's array (axis already mapped through transpose_forward) -> the index
    after nnU-Net's crop to non-zero and resampling."""
    lo, hi = properties["bbox_used_for_cropping"][axis_t]
    length = properties["shape_before_cropping"][axis_t]
    if not 0 <= index < length:
        raise LLMSettingError(f"slice {index} is out of range: the image has {length} slices on that axis "
                              f"(0..{length - 1})", "--slice")
    if not lo <= index < hi:
        raise LLMSettingError(f"slice {index} lies outside the region nnU-Net keeps (non-zero bounding box "
                              f"{lo}..{hi - 1} on that axis)", "--slice")
    return int(min(new_len - 1, np.floor((index - lo + 0.5) * new_len / (hi - lo))))


def to_original_index(index_p: int, axis_t: int, properties: dict, new_len: int) -> int:
    """The inverse of ``to_preprocessed_index``: the input file's slice at the centre of preprocessed slice
    ``index_p``."""
    lo, hi = properties["bbox_used_for_cropping"][axis_t]
    return int(lo + min(hi - lo - 1, np.floor((index_p + 0.5) * (hi - lo) / new_len)))


def choose_window(shape: tuple[int, ...], patch: tuple[int, ...], centre: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) per axis: ``patch`` long (or the whole axis when shorter), centred on ``centre``."""
    window = []
    for n, p, c in zip(shape, patch, centre, strict=True):
        if n <= p:
            window.append((0, n))
        else:
            start = int(np.clip(c - p // 2, 0, n - p))
            window.append((start, start + p))
    return window


def pad_to(array: np.ndarray, target: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """Zero-pad the spatial axes of (C, *s) symmetrically up to ``target``; returns it and the padding before."""
    before = [max(0, t - s) // 2 for s, t in zip(array.shape[1:], target, strict=True)]
    widths = [(0, 0)] + [(b, max(0, t - s) - b) for b, s, t in zip(before, array.shape[1:], target, strict=True)]
    return np.pad(array, widths, mode="constant"), before


@dataclass
class NetworkInput:
    """The part of the preprocessed case that goes through the network once, and where it lies."""

    volume: np.ndarray  # (C, *spatial): what the input is cut from, the case (3d) or its slice (2d)
    window: list[tuple[int, int]]  # [start, stop) per spatial axis of ``volume``
    padded: np.ndarray  # (C, *target): the window zero-padded to the patch and a multiple of the total stride
    pad_before: list[int]  # the padding before the window, per spatial axis

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.volume.shape[1:]

    @property
    def target(self) -> tuple[int, ...]:
        return self.padded.shape[1:]

    def inner(self, values: np.ndarray) -> np.ndarray:
        """The window's part of (*target) ``values``, (*window size)."""
        return values[tuple(slice(b, b + stop - start) for b, (start, stop) in zip(self.pad_before, self.window,
                                                                                     strict=True))]

    def place(self, values: np.ndarray, fill: float, dtype: type) -> np.ndarray:
        """(*target) ``values`` put back where the window lies in (*spatial), ``fill`` elsewhere."""
        canvas = np.full(self.spatial, fill, dtype=dtype)
        canvas[tuple(slice(a, b) for a, b in self.window)] = self.inner(values)
        return canvas


def network_input(data: np.ndarray, config: ConfigurationManager, axis_t: int, index_p: int, region: str,
                  transpose: list[int]) -> NetworkInput:
    """The window of ``data`` (C, *shape; preprocessed) that goes through the network: one patch centred on the
    slice, or the whole image, zero-padded to the patch size and a multiple of the network's total stride."""
    patch = tuple(int(p) for p in config.patch_size)
    strides = np.prod(np.array(config.pool_op_kernel_sizes, dtype=int), axis=0).tolist()
    if len(patch) == 2:
        if axis_t != 0:
            raise LLMSettingError(f"a 2d configuration sees slices along axis {transpose[0]} of the input array; "
                                  f"use --slice-axis {transpose[0]}", "--slice-axis")
        volume = data[:, index_p]  # (C, H, W): the 2d network's input
    else:
        volume = data
    spatial = volume.shape[1:]
    centre = [s // 2 for s in spatial]
    if len(patch) == 3:
        centre[axis_t] = index_p
    window = choose_window(spatial, patch, tuple(centre)) if region == "patch" else [(0, s) for s in spatial]
    crop = volume[(slice(None), *[slice(a, b) for a, b in window])]
    target = [max(c, p if region == "patch" else 0) for c, p in zip(crop.shape[1:], patch, strict=True)]
    target = [int(np.ceil(t / s) * s) for t, s in zip(target, strides, strict=True)]
    padded, pad_before = pad_to(crop, tuple(target))
    return NetworkInput(volume, window, padded, pad_before)


# ----------------------------------------------------------------------------------------------- main computation

def compute_activation_maps(model_folder: str | os.PathLike, images: list[str], fold: str = "0",
                            checkpoint: str = "checkpoint_final.pth", device: str = "cpu",
                            slice_axis: int = 0, slice_index: int | None = None, region: str = "patch",
                            reduction: str = "mean-abs", upsample: str = "trilinear",
                            channel: int = 0, predictor: nnUNetPredictor | None = None) -> ActivationMaps:
    """Run the model on one case and capture the bottleneck block's input and output (see the module doc).

    slice_axis / slice_index: in the input file's array as nnU-Net's reader returns it (SimpleITK: axis 0 is
    z); default index: the middle of the preprocessed image.
    """
    import torch

    from nnunetv2_llm.model.spec import BottleneckSpec

    _check_choices(reduction, slice_axis, region)
    model_folder = Path(model_folder).expanduser().resolve()
    fold = str(fold)
    if predictor is None:  # check the cheap things before loading the model
        spec = check_model_folder(model_folder, fold, checkpoint)
        resolve_images(images, load_dataset_json(model_folder))
        predictor = load_predictor(model_folder, fold, checkpoint, device)
    else:
        spec = BottleneckSpec.from_model_folder(model_folder)
    files = resolve_images(images, predictor.dataset_json)
    if not 0 <= channel < len(files):
        raise LLMSettingError(f"--channel {channel} is out of range (the model takes {len(files)})", "--channel")
    data, properties = preprocess_case(predictor, files)
    transpose = list(predictor.plans_manager.transpose_forward)
    axis_t = transpose.index(slice_axis)
    index_p = _preprocessed_slice(slice_index, axis_t, properties, data.shape[1 + axis_t])
    net_in = network_input(data, predictor.configuration_manager, axis_t, index_p, region, transpose)

    network = predictor.network.to(predictor.device).eval()
    before, after, logits = capture_bottleneck(network, torch.from_numpy(net_in.padded[None]).to(predictor.device))
    before, after = before[0].numpy(), after[0].numpy()
    segmentation = predictor.label_manager.convert_logits_to_segmentation(logits[0]).numpy()
    mode = "nearest" if upsample == "nearest" else ("bilinear" if len(net_in.spatial) == 2 else "trilinear")
    maps = {key: _on_slice(net_in.place(_upsampled(array, reduction, net_in.target, mode), np.nan, np.float32),
                           net_in, axis_t, index_p)
            for key, array in (("before", before), ("after", after), ("change", after - before))}
    meta = {**_run_meta(model_folder, fold, checkpoint, predictor, files, channel), **_spec_meta(spec),
            "reduction": reduction, "upsample": mode, "region": region, "preprocessed_shape": list(data.shape[1:]),
            "patch_input_shape": list(net_in.target), "bottleneck_shape": list(before.shape[1:]),
            "pixel_spacing": _pixel_spacing(properties, predictor.configuration_manager, transpose, axis_t)}
    original_index = to_original_index(index_p, axis_t, properties, data.shape[1 + axis_t])
    return ActivationMaps(before, after, np.take(data[channel], index_p, axis=axis_t), maps,
                          _on_slice(net_in.place(segmentation, 0, np.int16), net_in, axis_t, index_p),
                          net_in.window, axis_t, index_p, (slice_axis, original_index), meta)


def _check_choices(reduction: str, slice_axis: int, region: str) -> None:
    if reduction not in REDUCTIONS:
        raise LLMSettingError(f"--reduce must be one of {REDUCTIONS}", "--reduce")
    if slice_axis not in (0, 1, 2):
        raise LLMSettingError("--slice-axis must be 0, 1 or 2", "--slice-axis")
    if region not in REGIONS:
        raise LLMSettingError("--region must be 'patch' or 'whole'", "--region")


def _preprocessed_slice(slice_index: int | None, axis_t: int, properties: dict, new_len: int) -> int:
    """The preprocessed index of the input file's ``slice_index``; None: the middle of the preprocessed image."""
    if slice_index is None:
        return new_len // 2
    return to_preprocessed_index(slice_index, axis_t, properties, new_len)


def preprocess_case(predictor: nnUNetPredictor, files: list[Path]) -> tuple[np.ndarray, dict]:
    """The case as the network sees it, (C, *shape) float32 after transpose, crop, resample and normalise, and
    nnU-Net's properties of that preprocessing (crop box, shapes, spacing)."""
    config = predictor.configuration_manager
    preprocessor = config.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, properties = preprocessor.run_case([str(f) for f in files], None, predictor.plans_manager, config,
                                                    predictor.dataset_json)
    return np.asarray(data, dtype=np.float32), properties


def _upsampled(array: np.ndarray, reduction: str, target: tuple[int, ...], mode: str) -> np.ndarray:
    """(C, *bottleneck) reduced over channels and interpolated to (*target)."""
    import torch
    import torch.nn.functional as F

    reduced = torch.from_numpy(reduce_channels(array, reduction))[None, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(reduced, size=tuple(target), mode=mode, **kwargs)[0, 0].numpy()


def _on_slice(canvas: np.ndarray, net_in: NetworkInput, axis_t: int, index_p: int) -> np.ndarray:
    """(*spatial) -> the (H, W) slice shown; the 2d network's input is that slice already."""
    return canvas if len(net_in.spatial) == 2 else np.take(canvas, index_p, axis=axis_t)


def _pixel_spacing(properties: dict, config: ConfigurationManager, transpose: list[int], axis_t: int) -> list[float]:
    """The in-plane spacing of the shown slice in the network's input space (the 2d configuration's spacing has no
    entry for the slice axis: the case's own is taken)."""
    ndim = len(transpose)
    spacing = [float(s) for s in properties.get("spacing", [1.0] * ndim)]
    is_2d = len(config.patch_size) == 2
    target_spacing = [spacing[transpose[0]], *config.spacing] if is_2d else list(config.spacing)
    return [target_spacing[a] for a in range(ndim) if a != axis_t]


def _run_meta(model_folder: Path, fold: str, checkpoint: str, predictor: nnUNetPredictor, files: list[Path],
              channel: int) -> dict:
    """The model, checkpoint and case a run looked at."""
    dataset_json = predictor.dataset_json
    return {
        "model_folder": str(model_folder), "model": model_folder.name, "dataset": model_folder.parent.name,
        "fold": fold, "checkpoint": checkpoint, "trainer": predictor.trainer_name,
        "configuration": model_folder.name.split("__")[-1],
        "case": _case_name(files[0], dataset_json.get("file_ending", ".nii.gz")),
        "image_files": [str(f) for f in files],
        "channel_name": str(dataset_json.get("channel_names", {}).get(str(channel), channel)),
        "labels": {int(v): k for k, v in dataset_json.get("labels", {}).items() if isinstance(v, int)},
    }


def _spec_meta(spec: BottleneckSpec) -> dict:
    """The LLM block's settings the figure names."""
    return {"llm_source": spec.source, "llm_layer": spec.layer_label,
            "llm_layers": spec.hf_config().num_hidden_layers,  # GPT-2 stores it as n_layer: read through the config
            "mixer": spec.mixer, "model_type": spec.model_type, "width": spec.width, "rank": spec.rank,
            "lora_rank": spec.lora_rank}
