"""The activation-maps figure: input / before / after / change, overlaid on the chosen slice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.tools.activation_maps.compute import ActivationMaps

if TYPE_CHECKING:  # matplotlib is imported where it is used: the command line starts without it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_activation_maps(result: ActivationMaps, out: str | os.PathLike, dpi: int = 150) -> Path:
    """Four panels: input (with the predicted labels and the analysed window), before, after, change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = result.image_slice
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    aspect = result.meta["pixel_spacing"][0] / result.meta["pixel_spacing"][1]
    panel_h = 3.4
    panel_w = float(np.clip(panel_h * image.shape[1] / (image.shape[0] * aspect), 2.4, 4.4))
    fig, axes = plt.subplots(1, 4, figsize=(4 * panel_w + 3.0, panel_h + 1.7), constrained_layout=True)
    for ax, (overlay, limits, cmap, title) in zip(axes, _panels(result), strict=True):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if overlay is None:
            _draw_labels_and_window(ax, result)
        else:
            _draw_overlay(fig, ax, overlay, limits, cmap, aspect)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_suptitle(result), fontsize=10)
    out = check_output(out, "-o", figure=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _panels(result: ActivationMaps) -> list[tuple[np.ndarray | None, tuple[float, float] | None, str | None, str]]:
    """(overlay (H, W) or None for the input panel, colour limits, colour map, title) of the four panels; before
    and after share one scale."""
    meta = result.meta
    before, after, change = (result.maps[k] for k in ("before", "after", "change"))
    shared = (float(np.nanmin([np.nanmin(before), np.nanmin(after)])),
              float(np.nanmax([np.nanmax(before), np.nanmax(after)])))
    change_min, change_max = float(np.nanmin(change)), float(np.nanmax(change))
    no_change = not change_max > 0
    reduction = "mean |a| over channels" if meta["reduction"] == "mean-abs" else "L2 norm over channels"
    return [
        (None, None, None, f"input ({meta['channel_name']}, normalised)"),
        (before, shared, "magma", f"before the LLM block\n{reduction}"),
        (after, shared, "magma", f"after the LLM block\n{reduction} (same scale)"),
        (change, (change_min, change_max if not no_change else 1e-12), "viridis",
         f"change: after − before, {reduction}\n"
         + ("none: the block is the identity here" if no_change
            else f"‖after − before‖ / ‖before‖ = {result.relative_change:.3g}")),
    ]


def _draw_labels_and_window(ax: Axes, result: ActivationMaps) -> None:
    """The predicted labels' contours and, when it is not the whole slice, the analysed window, with a legend."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    labels = result.meta.get("labels", {})
    handles = []
    colours = plt.get_cmap("tab10")
    for value in sorted(v for v in np.unique(result.segmentation_slice) if v > 0):
        colour = colours((value - 1) % 10)
        ax.contour((result.segmentation_slice == value).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        handles.append(Line2D([], [], color=colour, label=f"predicted {labels.get(int(value), f'label {value}')}"))
    h_window, w_window = _in_plane(result.window, result.slice_axis, result.image_slice.ndim)
    if (h_window[1] - h_window[0], w_window[1] - w_window[0]) != result.image_slice.shape:
        ax.add_patch(Rectangle((w_window[0] - 0.5, h_window[0] - 0.5), w_window[1] - w_window[0],
                               h_window[1] - h_window[0], fill=False, ec="cyan", ls="--", lw=1.2))
        handles.append(Line2D([], [], color="cyan", ls="--", label="analysed patch"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)


def _draw_overlay(fig: Figure, ax: Axes, overlay: np.ndarray, limits: tuple[float, float], cmap: str,
                  aspect: float) -> None:
    """A (H, W) map over the image, transparent outside the analysed window (NaN), with its colour bar."""
    shown = ax.imshow(np.ma.masked_invalid(overlay), cmap=cmap, vmin=limits[0], vmax=limits[1], alpha=0.55,
                      aspect=aspect, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02, shrink=0.8)
    bar.solids.set_alpha(1.0)
    bar.ax.tick_params(labelsize=8)


def _suptitle(result: ActivationMaps) -> str:
    """Which model, LLM layer, case and slice the figure shows, and the shapes that went through the network."""
    meta = result.meta
    axis, index = result.original_slice
    lora = f", LoRA r={meta['lora_rank']}" if meta.get("lora_rank") else ""
    return (
        f"Bottleneck activations before/after the LLM block — {meta['dataset']} / {meta['model']}, "
        f"fold {meta['fold']}, {meta['checkpoint']}\n"
        f"LLM: {Path(meta['llm_source']).name} ({meta['model_type']}), layer {meta['llm_layer']} (0-based) of "
        f"{meta['llm_layers']}, mixer '{meta['mixer']}'{lora}, width {meta['width']}, projection rank "
        f"{meta['rank']}\n"
        f"case {meta['case']}, slice {index} on axis {axis} of the input array (network-input slice "
        f"{result.slice_index} of {meta['preprocessed_shape'][result.slice_axis]}); bottleneck "
        f"{result.before.shape[0]} ch × {'×'.join(map(str, meta['bottleneck_shape']))} from a "
        f"{'×'.join(map(str, meta['patch_input_shape']))} input, {meta['upsample']} upsampling")


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
