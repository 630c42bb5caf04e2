"""``nnunetv2_llm activation-maps``: the bottleneck features before and after the LLM block, on an input slice.

The model is loaded by nnU-Net itself (``nnUNetPredictor.initialize_from_trained_model_folder``: the trainer's
``build_network_architecture`` and the checkpoint's weights) and the case is preprocessed by the model's own
preprocessor (transpose, crop to non-zero, resample, normalise), so the network sees exactly what
``nnUNetv2_predict`` feeds it. One patch (the configuration's patch size, centred on the chosen slice; or the
whole image with ``--region whole``) goes through the network once; forward hooks on the bottleneck block
capture its input x and output y = x + delta, shape (C, *bottleneck). Each is reduced over channels per voxel
(mean |a| or L2 norm), upsampled to the patch and overlaid on the slice: input / before / after / change
(the reduction of y - x). Everything is shown in the network's input space (after nnU-Net's preprocessing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_llm.common.errors import LLMSettingError

if TYPE_CHECKING:  # torch and nnU-Net are imported where they are used: the command line starts without them
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_llm.model.block import LLMBottleneckBlock

REDUCTIONS = ("mean-abs", "l2")


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

def check_model_folder(model_folder: Path, fold: str, checkpoint: str) -> dict:
    """The folder's plans.json, after checking the folder is a trained nnunetv2_llm model folder."""
    from nnunetv2_llm.model.spec import PLANS_KEY

    if not model_folder.is_dir():
        raise LLMSettingError(f"model folder {model_folder} does not exist", "-m")
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise LLMSettingError(f"{model_folder} has no {name}: -m must be the trainer folder "
                                  "(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)", "-m")
    checkpoint_path = model_folder / f"fold_{fold}" / checkpoint
    if not checkpoint_path.is_file():
        found = sorted(str(p.relative_to(model_folder)) for p in model_folder.glob("fold_*/*.pth"))
        raise LLMSettingError(f"no checkpoint {checkpoint_path}; available: {found or 'none'}", "-f / -chk")
    plans = json.loads((model_folder / "plans.json").read_text())
    if PLANS_KEY not in plans:
        raise LLMSettingError(
            f"{model_folder} was not trained with an nnunetv2_llm trainer: its plans.json has no "
            f'"{PLANS_KEY}" block, so there is no LLM block to look at', "-m")
    return plans


def load_predictor(model_folder: str | os.PathLike, fold: str = "0", checkpoint: str = "checkpoint_final.pth",
                   device: str = "cpu") -> nnUNetPredictor:
    """nnU-Net's predictor for the model folder (network rebuilt by the trainer class, checkpoint loaded)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_llm.common.environment import ext_trainer_value

    model_folder = Path(model_folder).expanduser().resolve()
    check_model_folder(model_folder, fold, checkpoint)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise LLMSettingError("--device cuda was asked for but no CUDA device is available", "--device")
    # nnU-Net finds the trainer class by name through nnUNet_extTrainer; add this package's trainers folder.
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=torch_device.type == "cuda",
                                        device=torch_device, verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                           checkpoint_name=checkpoint)
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous
    bottleneck_of(predictor.network)
    return predictor


def bottleneck_of(network: torch.nn.Module) -> LLMBottleneckBlock:
    """The LLMBottleneckBlock of a (possibly torch.compile'd) network."""
    from nnunetv2_llm.model.block import LLMBottleneckBlock

    network = getattr(network, "_orig_mod", network)
    block = getattr(network, "bottleneck", None)
    if not isinstance(block, LLMBottleneckBlock):
        raise LLMSettingError(f"the network ({type(network).__name__}) has no LLM bottleneck block", "-m")
    return block


def capture_bottleneck(network: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``network`` on x (B, C, *patch) once; returns (block input, block output, logits), all on CPU float32."""
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
    lo, hi = properties["bbox_used_for_cropping"][axis_t]
    return int(lo + min(hi - lo - 1, np.floor((index_p + 0.5) * (hi - lo) / new_len)))


def choose_window(shape: tuple[int, ...], patch: tuple[int, ...], centre: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) per axis: ``patch`` long (or the whole axis when shorter), centred on ``centre``."""
    window = []
    for n, p, c in zip(shape, patch, centre):
        if n <= p:
            window.append((0, n))
        else:
            start = int(np.clip(c - p // 2, 0, n - p))
            window.append((start, start + p))
    return window


def pad_to(array: np.ndarray, target: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """Zero-pad the spatial axes of (C, *s) symmetrically up to ``target``; returns it and the padding before."""
    before = [max(0, t - s) // 2 for s, t in zip(array.shape[1:], target)]
    widths = [(0, 0)] + [(b, max(0, t - s) - b) for b, s, t in zip(before, array.shape[1:], target)]
    return np.pad(array, widths, mode="constant"), before


# ----------------------------------------------------------------------------------------------- main computation

def compute_activation_maps(model_folder: str | os.PathLike, images: list[str], fold: str = "0",
                            checkpoint: str = "checkpoint_final.pth", device: str = "cpu",
                            slice_axis: int = 0, slice_index: int | None = None, region: str = "patch",
                            reduction: str = "mean-abs", upsample: str = "trilinear",
                            channel: int = 0, predictor: nnUNetPredictor | None = None) -> ActivationMaps:
    """Run the model on one case and capture the bottleneck block's input and output (see module doc).

    slice_axis / slice_index: in the input file's array as nnU-Net's reader returns it (SimpleITK: axis 0 is
    z); default index: the middle of the preprocessed image.
    """
    import torch
    import torch.nn.functional as F

    from nnunetv2_llm.model.spec import BottleneckSpec

    if reduction not in REDUCTIONS:
        raise LLMSettingError(f"--reduce must be one of {REDUCTIONS}", "--reduce")
    if slice_axis not in (0, 1, 2):
        raise LLMSettingError("--slice-axis must be 0, 1 or 2", "--slice-axis")
    if region not in ("patch", "whole"):
        raise LLMSettingError("--region must be 'patch' or 'whole'", "--region")
    model_folder = Path(model_folder).expanduser().resolve()
    fold = str(fold)
    if predictor is None:  # check the cheap things before loading the model
        check_model_folder(model_folder, fold, checkpoint)
        resolve_images(images, json.loads((model_folder / "dataset.json").read_text()))
        predictor = load_predictor(model_folder, fold, checkpoint, device)
    plans_manager, config = predictor.plans_manager, predictor.configuration_manager
    dataset_json = predictor.dataset_json
    files = resolve_images(images, dataset_json)
    if not 0 <= channel < len(files):
        raise LLMSettingError(f"--channel {channel} is out of range (the model takes {len(files)})", "--channel")

    preprocessor = config.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        data, _, properties = preprocessor.run_case([str(f) for f in files], None, plans_manager, config,
                                                    dataset_json)
    data = np.asarray(data, dtype=np.float32)  # (C, *shape) after transpose, crop, resample, normalise
    shape = data.shape[1:]
    transpose = list(plans_manager.transpose_forward)
    axis_t = transpose.index(slice_axis)
    if slice_index is None:
        index_p = shape[axis_t] // 2
    else:
        index_p = to_preprocessed_index(slice_index, axis_t, properties, shape[axis_t])
    original_index = to_original_index(index_p, axis_t, properties, shape[axis_t])

    patch = tuple(int(p) for p in config.patch_size)
    strides = np.prod(np.array(config.pool_op_kernel_sizes, dtype=int), axis=0).tolist()
    is_2d = len(patch) == 2
    if is_2d:
        if axis_t != 0:
            raise LLMSettingError(f"a 2d configuration sees slices along axis {transpose[0]} of the input array; "
                                  f"use --slice-axis {transpose[0]}", "--slice-axis")
        volume = data[:, index_p]  # (C, H, W): the 2d network's input
        spatial = shape[1:]
    else:
        volume, spatial = data, shape
    centre = [s // 2 for s in spatial]
    if not is_2d:
        centre[axis_t] = index_p
    window = choose_window(spatial, patch, tuple(centre)) if region == "patch" else [(0, s) for s in spatial]
    crop = volume[(slice(None), *[slice(a, b) for a, b in window])]
    target = [max(c, p if region == "patch" else 0) for c, p in zip(crop.shape[1:], patch)]
    target = [int(np.ceil(t / s) * s) for t, s in zip(target, strides)]
    padded, pad_before = pad_to(crop, tuple(target))

    network = predictor.network.to(predictor.device).eval()
    x = torch.from_numpy(padded[None]).to(predictor.device)
    before, after, logits = capture_bottleneck(network, x)
    segmentation = predictor.label_manager.convert_logits_to_segmentation(logits[0]).numpy()

    mode = "nearest" if upsample == "nearest" else ("bilinear" if is_2d else "trilinear")
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    inner = tuple(slice(b, b + c) for b, c in zip(pad_before, crop.shape[1:]))
    maps = {}
    for key, array in (("before", before[0].numpy()), ("after", after[0].numpy()),
                       ("change", (after[0] - before[0]).numpy())):
        reduced = torch.from_numpy(reduce_channels(array, reduction))[None, None]
        up = F.interpolate(reduced, size=tuple(target), mode=mode, **kwargs)[0, 0].numpy()[inner]
        canvas = np.full(spatial, np.nan, dtype=np.float32)
        canvas[tuple(slice(a, b) for a, b in window)] = up
        maps[key] = canvas if is_2d else np.take(canvas, index_p, axis=axis_t)
    seg_canvas = np.zeros(spatial, dtype=np.int16)
    seg_canvas[tuple(slice(a, b) for a, b in window)] = segmentation[inner]
    image_slice = volume[channel] if is_2d else np.take(data[channel], index_p, axis=axis_t)
    seg_slice = seg_canvas if is_2d else np.take(seg_canvas, index_p, axis=axis_t)

    spec = BottleneckSpec.from_plans(plans_manager.plans)
    in_plane = [a for a in range(len(shape)) if a != axis_t]
    spacing = [float(s) for s in properties.get("spacing", [1.0] * len(shape))]
    target_spacing = list(config.spacing) if not is_2d else [spacing[transpose[0]], *config.spacing]
    meta = {
        "model_folder": str(model_folder), "model": model_folder.name, "dataset": model_folder.parent.name,
        "fold": fold, "checkpoint": checkpoint, "trainer": predictor.trainer_name,
        "configuration": model_folder.name.split("__")[-1],
        "case": _case_name(files[0], dataset_json.get("file_ending", ".nii.gz")),
        "image_files": [str(f) for f in files], "channel_name": str(dataset_json.get("channel_names", {}).get(
            str(channel), channel)),
        "labels": {int(v): k for k, v in dataset_json.get("labels", {}).items() if isinstance(v, int)},
        "llm_source": spec.source, "llm_layer": spec.layer, "llm_layers": spec.llm_config.get("num_hidden_layers"),
        "mixer": spec.mixer, "model_type": spec.model_type, "width": spec.width, "rank": spec.rank,
        "lora_rank": spec.lora_rank, "reduction": reduction, "upsample": mode, "region": region,
        "preprocessed_shape": list(shape), "patch_input_shape": list(target),
        "bottleneck_shape": list(before.shape[2:]), "pixel_spacing": [target_spacing[a] for a in in_plane],
    }
    return ActivationMaps(before[0].numpy(), after[0].numpy(), image_slice, maps, seg_slice, window, axis_t,
                          index_p, (slice_axis, original_index), meta)


# ----------------------------------------------------------------------------------------------- figure

def plot_activation_maps(result: ActivationMaps, out: str | os.PathLike, dpi: int = 150) -> Path:
    """Four panels: input (with the predicted labels and the analysed window), before, after, change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    meta = result.meta
    image = result.image_slice
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    aspect = meta["pixel_spacing"][0] / meta["pixel_spacing"][1]
    before, after, change = (result.maps[k] for k in ("before", "after", "change"))
    shared_max = float(np.nanmax([np.nanmax(before), np.nanmax(after)]))
    shared_min = float(np.nanmin([np.nanmin(before), np.nanmin(after)]))
    change_min, change_max = float(np.nanmin(change)), float(np.nanmax(change))
    no_change = not change_max > 0
    reduction = "mean |a| over channels" if meta["reduction"] == "mean-abs" else "L2 norm over channels"

    panel_h = 3.4
    panel_w = float(np.clip(panel_h * image.shape[1] / (image.shape[0] * aspect), 2.4, 4.4))
    fig, axes = plt.subplots(1, 4, figsize=(4 * panel_w + 3.0, panel_h + 1.7), constrained_layout=True)
    panels = [
        ("input", None, None, None, f"input ({meta['channel_name']}, normalised)"),
        ("before", before, (shared_min, shared_max), "magma", f"before the LLM block\n{reduction}"),
        ("after", after, (shared_min, shared_max), "magma", f"after the LLM block\n{reduction} (same scale)"),
        ("change", change, (change_min, change_max if not no_change else 1e-12), "viridis",
         f"change: after − before, {reduction}\n"
         + ("none: the block is the identity here" if no_change
            else f"‖after − before‖ / ‖before‖ = {result.relative_change:.3g}")),
    ]
    h_window, w_window = _in_plane(result.window, result.slice_axis, image.ndim)
    for ax, (key, overlay, limits, cmap, title) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if overlay is None:
            labels = meta.get("labels", {})
            handles = []
            colours = plt.get_cmap("tab10")
            for value in sorted(v for v in np.unique(result.segmentation_slice) if v > 0):
                colour = colours((value - 1) % 10)
                ax.contour((result.segmentation_slice == value).astype(float), levels=[0.5], colors=[colour],
                           linewidths=1.2)
                handles.append(Line2D([], [], color=colour,
                                      label=f"predicted {labels.get(int(value), f'label {value}')}"))
            if (h_window[1] - h_window[0], w_window[1] - w_window[0]) != image.shape:
                ax.add_patch(Rectangle((w_window[0] - 0.5, h_window[0] - 0.5), w_window[1] - w_window[0],
                                       h_window[1] - h_window[0], fill=False, ec="cyan", ls="--", lw=1.2))
                handles.append(Line2D([], [], color="cyan", ls="--", label="analysed patch"))
            if handles:
                ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
        else:
            masked = np.ma.masked_invalid(overlay)
            shown = ax.imshow(masked, cmap=cmap, vmin=limits[0], vmax=limits[1], alpha=0.55, aspect=aspect,
                              interpolation="nearest")
            bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02, shrink=0.8)
            bar.solids.set_alpha(1.0)
            bar.ax.tick_params(labelsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axis, index = result.original_slice
    lora = f", LoRA r={meta['lora_rank']}" if meta.get("lora_rank") else ""
    fig.suptitle(
        f"Bottleneck activations before/after the LLM block — {meta['dataset']} / {meta['model']}, "
        f"fold {meta['fold']}, {meta['checkpoint']}\n"
        f"LLM: {Path(meta['llm_source']).name} ({meta['model_type']}), layer {meta['llm_layer']} (0-based) of "
        f"{meta['llm_layers']}, mixer '{meta['mixer']}'{lora}, width {meta['width']}, projection rank "
        f"{meta['rank']}\n"
        f"case {meta['case']}, slice {index} on axis {axis} of the input array (network-input slice "
        f"{result.slice_index} of {meta['preprocessed_shape'][result.slice_axis]}); bottleneck "
        f"{result.before.shape[0]} ch × {'×'.join(map(str, meta['bottleneck_shape']))} from a "
        f"{'×'.join(map(str, meta['patch_input_shape']))} input, {meta['upsample']} upsampling",
        fontsize=10)
    out = check_output(out, "-o", figure=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def check_output(path: str | os.PathLike, setting: str, figure: bool = False) -> Path:
    """``path`` once its folder exists (created if needed) and is writable, and, for a figure, its extension is a
    format matplotlib writes; checked before the model runs."""
    path = Path(path).expanduser()
    if figure:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if path.suffix.lower().lstrip(".") not in formats:
            raise LLMSettingError(f"cannot write a figure to {path}: the name must end in one of "
                                  f"{', '.join('.' + f for f in sorted(formats))}", setting)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMSettingError(f"cannot create the folder of {path}: {e.strerror}", setting) from None
    if not os.access(path.parent, os.W_OK):
        raise LLMSettingError(f"cannot write to {path.parent} (no permission)", setting)
    return path


def _in_plane(window: list[tuple[int, int]], axis: int, ndim: int) -> list[tuple[int, int]]:
    """The window's two in-plane ranges (the window is 2-D already for a 2d configuration)."""
    return window if len(window) == ndim else [w for a, w in enumerate(window) if a != axis]


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model-folder", required=True,
                        help="trainer folder with plans.json, dataset.json and fold_X/ "
                             "(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)")
    parser.add_argument("-f", "--fold", default="0", help="fold to load (default 0; 'all' for fold_all)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-i", "--input", nargs="+", required=True,
                        help="the case's image file(s) in channel order; CASE_0000.nii.gz alone finds its "
                             "other channels")
    parser.add_argument("-o", "--output", required=True, help="figure to write (.png, .pdf, .svg)")
    parser.add_argument("--slice-axis", type=int, default=0,
                        help="axis of the image array as nnU-Net reads it (SimpleITK: 0 = z); default 0")
    parser.add_argument("--slice", type=int, default=None,
                        help="slice index along --slice-axis in the input image (default: the middle)")
    parser.add_argument("--region", choices=("patch", "whole"), default="patch",
                        help="'patch': one patch of the training patch size centred on the slice, as the network "
                             "saw in training (default); 'whole': the whole preprocessed image")
    parser.add_argument("--reduce", choices=REDUCTIONS, default="mean-abs",
                        help="per-voxel reduction over channels (default mean-abs)")
    parser.add_argument("--upsample", choices=("trilinear", "nearest"), default="trilinear",
                        help="'nearest' shows the true bottleneck resolution (default trilinear; bilinear in 2d)")
    parser.add_argument("--channel", type=int, default=0, help="input channel shown under the maps (default 0)")
    parser.add_argument("--save-arrays", help="also write the captured tensors and maps to this .npz")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))


def main(args: argparse.Namespace) -> int:
    check_output(args.output, "-o", figure=True)
    if args.save_arrays:
        check_output(args.save_arrays, "--save-arrays")
    result = compute_activation_maps(args.model_folder, args.input, fold=args.fold, checkpoint=args.checkpoint,
                                     device=args.device, slice_axis=args.slice_axis, slice_index=args.slice,
                                     region=args.region, reduction=args.reduce, upsample=args.upsample,
                                     channel=args.channel)
    out = plot_activation_maps(result, args.output)
    if args.save_arrays:
        np.savez_compressed(args.save_arrays, before=result.before, after=result.after,
                            image_slice=result.image_slice, segmentation_slice=result.segmentation_slice,
                            **{f"map_{k}": v for k, v in result.maps.items()},
                            meta=json.dumps(result.meta))
        print(f"arrays: {args.save_arrays}")
    print(f"wrote {out}")
    print(f"  bottleneck {result.before.shape[0]} channels x {result.meta['bottleneck_shape']}; "
          f"||after - before|| / ||before|| = {result.relative_change:.4g}")
    return 0
