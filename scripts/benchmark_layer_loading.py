#!/usr/bin/env python
"""Single-layer loading benchmark: time and peak memory to build the bottleneck block from layer k of a sharded
Llama-3.1-8B-shaped safetensors checkpoint, against loading the whole model with transformers (what
MedVisionLlama does to keep one layer).

The checkpoint is synthetic (``nnunetv2_llm.llm.synthetic``): Llama-3.1-8B's shapes (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, vocab 128256, bfloat16), ``--layers`` decoder layers plus embeddings and head, cut
into ``--shard-mib`` shards the way ``save_pretrained`` cuts them, random weights. It is written once to
``--folder`` (default: the synthetic cache in the temp dir) and reused.

Each measurement runs in a fresh Python process (``run_measurement``). "Above the empty process" means above the
RSS after importing torch, transformers, safetensors and nnunetv2_llm; the RSS high-water mark (VmHWM) is reset at
that point (``/proc/self/clear_refs``), since importing torch alone peaks higher than what follows. Resident pages
of memory-mapped safetensors files count in RSS.
Targets: peak RSS above the empty process < 1.5 x the layer's own bytes, and < 5 s.

    python scripts/benchmark_layer_loading.py [--layers 4] [--layer-index 2] [--shard-mib 1024] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nnunetv2_llm.common.errors import LLMSettingError, exit_on_setting_error
from nnunetv2_llm.common.outputs import check_report_free, write_json_and_markdown
from nnunetv2_llm.llm.synthetic import PRESETS, ensure_synthetic_checkpoint, layer_nbytes, write_synthetic_checkpoint
from nnunetv2_llm.tools.benchmark.measurement import (
    MeasurementFailed,
    current_rss,
    peak_rss,
    report_measurement,
    reset_peak_rss,
    run_measurement,
)

RSS_TARGET = 1.5
GIB = 2 ** 30
TIME_TARGET_S = 5.0
SETTINGS = {"source_setting": "--folder", "layer_setting": "--layer-index"}  # this script's names in errors


def child_single(folder: str, index: int, channels: int, rank: int) -> dict:
    """Build the bottleneck block from layer ``index`` the way the trainer does: make_spec_and_layer (config,
    read the layer, checksum) then build_mixer on the tensors it read (``reuse_layer``: assigned to a
    meta-device layer, not read again)."""
    import gc

    import safetensors  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from nnunetv2_llm.model.block import LLMBottleneckBlock
    from nnunetv2_llm.model.network import build_mixer, reuse_layer
    from nnunetv2_llm.model.spec import LLMChoice, make_spec_and_layer

    gc.collect()
    peak_imports = peak_rss()
    reset = reset_peak_rss()
    rss0, peak0 = current_rss(), peak_rss()
    t0 = time.perf_counter()
    spec, layer_read = make_spec_and_layer(LLMChoice("pretrained", folder, index, rank=rank, **SETTINGS))
    t1 = time.perf_counter()
    rss_spec, peak_spec = current_rss(), peak_rss()
    with reuse_layer(spec, layer_read):
        block = LLMBottleneckBlock(channels, spec.width, spec.rank, build_mixer(spec))
    del layer_read
    t2 = time.perf_counter()
    layer_bytes = sum(p.numel() * p.element_size() for p in block.mixer.parameters())
    gc.collect()
    return {
        "rss_empty": rss0, "peak_before": peak0, "peak_of_imports": peak_imports, "peak_reset": reset,
        "seconds_spec": t1 - t0, "seconds_build": t2 - t1,
        "seconds_total": t2 - t0, "peak_after_spec": peak_spec, "rss_after_spec": rss_spec, "peak": peak_rss(),
        "rss_end": current_rss(), "layer_bytes": layer_bytes, "layer_dtype": str(next(block.mixer.parameters()).dtype),
        "layer_params": sum(p.numel() for p in block.mixer.parameters()),
        "block_trainable_params": sum(p.numel() for p in block.parameters() if p.requires_grad),
        "torch": torch.__version__,
    }


def child_full(folder: str, index: int) -> dict:
    """Load the whole model with transformers, then keep one layer (MedVisionLlama's way)."""
    import gc

    import safetensors  # noqa: F401
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401

    gc.collect()
    peak_imports = peak_rss()
    reset = reset_peak_rss()
    rss0, peak0 = current_rss(), peak_rss()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    layer = model.model.layers[index]
    t1 = time.perf_counter()
    peak_loaded, rss_loaded = peak_rss(), current_rss()
    # transformers 5 may return weights still backed by the memory-mapped files (read lazily); whatever then
    # uses the model (moving it to a device, a forward pass) reads them: touch every weight once to count that.
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum() if p.numel() < 2 ** 27 else sum(c.float().sum() for c in p.split(4096))
    t2 = time.perf_counter()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    peak_touched = peak_rss()
    del model
    gc.collect()
    return {"rss_empty": rss0, "peak_before": peak0, "peak_of_imports": peak_imports, "peak_reset": reset,
            "seconds_total": t1 - t0, "peak": peak_loaded, "rss_loaded": rss_loaded,
            "seconds_touch_all": t2 - t1, "peak_touched": peak_touched,
            "rss_end": current_rss(), "model_bytes": model_bytes, "layer_bytes": layer_bytes,
            "transformers": transformers.__version__}


def run_child(kind: str, args: argparse.Namespace, folder: Path) -> dict:
    """One measurement (``child_single`` or ``child_full``) in a fresh Python process."""
    request = {"kind": kind, "folder": str(folder), "index": args.layer_index, "channels": args.channels,
               "rank": args.rank}
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        return run_measurement([__file__, "--child"], request, env)
    except MeasurementFailed as e:
        raise SystemExit(f"{kind} measurement failed ({e.returncode}):\n{e.stdout[-2000:]}\n"
                         f"{e.stderr[-4000:]}") from None


def child_entry(request: dict) -> int:
    """The child process: run the requested measurement and report it."""
    if request["kind"] == "single":
        result = child_single(request["folder"], request["index"], request["channels"], request["rank"])
    else:
        result = child_full(request["folder"], request["index"])
    report_measurement(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help="checkpoint folder (written if missing)")
    parser.add_argument("--preset", default="llama-8b", choices=sorted(PRESETS),
                        help="synthetic shapes (tiny-llama for a smoke test)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the synthetic checkpoint")
    parser.add_argument("--layer-index", type=int, default=2, help="the layer k to build the block from")
    parser.add_argument("--shard-mib", type=float, default=1024, help="shard size when writing the checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats of the single-layer build")
    parser.add_argument("--skip-full", action="store_true", help="skip the whole-model transformers load")
    parser.add_argument("--channels", type=int, default=256, help="bottleneck channels (Hippocampus 3d_fullres: 256)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--output", default="layer_loading_benchmark", help="folder for the JSON and markdown")
    parser.add_argument("--overwrite", action="store_true", help="replace layer_loading.json/.md already in --output")
    parser.add_argument("--child", metavar="REQUEST_JSON", help=argparse.SUPPRESS)  # run_child's process
    args = parser.parse_args(argv)

    if args.child:
        return child_entry(json.loads(args.child))
    with exit_on_setting_error(Path(__file__).name):
        return run(args)


def prepare_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint folder (written unless ``--folder`` holds one), with ``args.layer_index`` checked against it and
    resolved (negative counts from the end) before any measurement."""
    from nnunetv2_llm.model.spec import LLMChoice, make_spec

    if args.repeats < 1:
        raise LLMSettingError(f"--repeats must be at least 1, got {args.repeats}", "--repeats")
    folder = Path(args.folder) if args.folder else None
    if folder is None or not (folder / "config.json").is_file():
        if not -args.layers <= args.layer_index < args.layers:  # checked before gigabytes are written
            raise LLMSettingError(f"layer index {args.layer_index} is out of range: the checkpoint gets --layers "
                                  f"{args.layers} layers (0..{args.layers - 1})", "--layer-index / --layers")
        shard_bytes = int(args.shard_mib * 2 ** 20)
        folder = write_synthetic_checkpoint(folder, args.preset, args.layers, True, shard_bytes) if folder \
            else ensure_synthetic_checkpoint(args.preset, args.layers, True, shard_bytes)
    args.layer_index = make_spec(LLMChoice("random", str(folder), args.layer_index, **SETTINGS)).layer
    return folder


def run(args: argparse.Namespace) -> int:
    """Prepare the checkpoint, measure the single-layer build ``--repeats`` times and the whole-model load once,
    each in a fresh process; write layer_loading.json and .md."""
    check_report_free(args.output, "layer_loading", args.overwrite)
    start = time.perf_counter()
    folder = prepare_checkpoint(args)
    written_s = time.perf_counter() - start
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] \
        if (folder / "model.safetensors.index.json").is_file() else {}
    print(f"checkpoint: {folder} ({len(set(index.values())) or 1} shards; layer {args.layer_index} in "
          f"{_shards_holding(index, args.layer_index)}); ready in {written_s:.1f} s", flush=True)

    singles = []
    for r in range(args.repeats):
        singles.append(run_child("single", args, folder))
        s = singles[-1]
        print(f"  single layer, run {r + 1}: {s['seconds_total']:.2f} s, peak RSS above empty "
              f"{(s['peak'] - s['rss_empty']) / 2 ** 20:.0f} MiB", flush=True)
    full = None if args.skip_full else run_child("full", args, folder)
    summary = summarise(args, folder, index, singles, full)
    write_json_and_markdown(args.output, "layer_loading", summary, to_markdown(summary))
    return 0


def _shards_holding(weight_map: dict[str, str], layer: int) -> list[str]:
    """The shard files that hold tensors of decoder layer ``layer``."""
    return sorted({shard for name, shard in weight_map.items() if f".layers.{layer}." in name})


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def summarise(args: argparse.Namespace, folder: Path, index: dict[str, str], singles: list[dict],
              full: dict | None) -> dict:
    """The measurements with medians over the single-layer runs and peaks relative to the layer's bytes."""
    layer_bytes = singles[0]["layer_bytes"]
    single_peak = _median([s["peak"] - s["rss_empty"] for s in singles])
    single_time = _median([s["seconds_total"] for s in singles])
    summary = {
        "checkpoint": str(folder), "layers_in_checkpoint": args.layers, "layer_index": args.layer_index,
        "shards": len(set(index.values())) or 1,
        "shards_holding_layer": _shards_holding(index, args.layer_index),
        "preset": args.preset, "layer_bytes": layer_bytes, "layer_bytes_expected": layer_nbytes(args.preset),
        "single": {"runs": singles, "median_seconds": single_time, "median_peak_above_empty": single_peak,
                   "peak_over_layer_bytes": single_peak / layer_bytes,
                   "median_seconds_spec": _median([s["seconds_spec"] for s in singles]),
                   "median_seconds_build": _median([s["seconds_build"] for s in singles])},
        "full": full,
        "targets": {"peak_over_layer_bytes": RSS_TARGET, "seconds": TIME_TARGET_S},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_count": os.cpu_count(),
    }
    if full:
        summary["full"]["peak_above_empty"] = full["peak"] - full["rss_empty"]
        summary["full"]["peak_over_layer_bytes"] = (full["peak"] - full["rss_empty"]) / layer_bytes
        summary["full"]["touched_peak_above_empty"] = full["peak_touched"] - full["rss_empty"]
        summary["full"]["touched_peak_over_layer_bytes"] = (full["peak_touched"] - full["rss_empty"]) / layer_bytes
    return summary


def to_markdown(s: dict) -> str:
    """layer_loading.md: what was loaded, then one table row per way of loading."""
    lines = [
        f"Layer {s['layer_index']} of a synthetic {s['preset']} checkpoint ({s['layers_in_checkpoint']} layers + "
        f"embeddings and head, {s['shards']} shards, bfloat16; the layer is {s['layer_bytes'] / 2 ** 20:.0f} MiB and "
        f"lies in {', '.join(s['shards_holding_layer']) or 'one file'}); {s['date']}, {s['cpu_count']} cores.",
        "",
        "| what | seconds (median) | peak RSS above empty process | / layer bytes | target |",
        "|---|---|---|---|---|",
        _single_row(s),
    ]
    if s["full"]:
        lines += _full_rows(s)
    return "\n".join(lines) + "\n"


def _single_row(s: dict) -> str:
    single, targets = s["single"], s["targets"]
    met = single["peak_over_layer_bytes"] < targets["peak_over_layer_bytes"] \
        and single["median_seconds"] < targets["seconds"]
    return (f"| nnunetv2_llm: read layer k once (make_spec_and_layer) + build the block from it | "
            f"{single['median_seconds']:.2f} (spec {single['median_seconds_spec']:.2f} + build "
            f"{single['median_seconds_build']:.2f}) | {single['median_peak_above_empty'] / GIB:.2f} GiB | "
            f"{single['peak_over_layer_bytes']:.2f} | < {targets['peak_over_layer_bytes']} and "
            f"< {targets['seconds']:.0f} s: {'met' if met else 'MISSED'} |")


def _full_rows(s: dict) -> list[str]:
    f = s["full"]
    rows = [f"| transformers from_pretrained (whole {s['layers_in_checkpoint']}-layer model, "
            f"{f['model_bytes'] / GIB:.2f} GiB), keep one layer: as returned (weights still mapped "
            f"from the files) | {f['seconds_total']:.2f} | "
            f"{f['peak_above_empty'] / GIB:.2f} GiB | {f['peak_over_layer_bytes']:.2f} | - |",
            f"| same, once every weight has been read (what moving the model to a device or running it "
            f"does) | {f['seconds_total'] + f['seconds_touch_all']:.2f} | "
            f"{f['touched_peak_above_empty'] / GIB:.2f} GiB | {f['touched_peak_over_layer_bytes']:.2f} | - |"]
    if s["preset"] == "llama-8b":
        real_bytes = 2 * 128256 * 4096 * 2 + 32 * s["layer_bytes"]  # embeddings + head, 32 layers
        rows.append(f"| (the real 32-layer model holds {real_bytes / GIB:.1f} "
                    "GiB: the whole-model load grows with it, the single-layer build does not) | | | | |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
