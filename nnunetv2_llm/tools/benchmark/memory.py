"""Peak memory of each trainer, measured in a fresh process (the RSS high-water mark is per process): max RSS on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA, over building the trainer and a few training steps.

The probe runs as ``python -m nnunetv2_llm.tools.benchmark --memory-probe REQUEST_JSON`` (``__main__.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from nnunetv2_llm.tools.benchmark.measurement import (
    MeasurementFailed,
    current_rss,
    peak_rss,
    report_measurement,
    reset_peak_rss,
    run_measurement,
)
from nnunetv2_llm.tools.benchmark.trainers import build_trainer, configure_torch, sync, synthetic_batch

if TYPE_CHECKING:
    import torch

PROBE_ARGV = ["-m", "nnunetv2_llm.tools.benchmark", "--memory-probe"]


def measure_memory(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Peak memory of each trainer in a fresh process (same imports everywhere), building it and running steps;
    ``{"error": ...}`` for a trainer whose probe failed."""
    results = {}
    for name in names:
        request = {"trainer": name, "dataset": args.dataset and str(args.dataset), "plan_preset": args.plan_preset,
                   "batch_size": args.batch_size, "configuration": args.configuration, "plans": args.plans,
                   "fold": args.fold, "device": device.type, "steps": args.memory_steps}
        try:
            results[name] = run_measurement(PROBE_ARGV, request)
        except MeasurementFailed as e:
            tail = (e.stderr or e.stdout).strip().splitlines()[-5:]
            results[name] = {"error": f"probe exited {e.returncode}: " + " | ".join(tail)}
            print(f"  memory {name}: failed ({results[name]['error']})")
            continue
        cuda = f", CUDA peak {results[name]['cuda_peak_allocated'] / 2 ** 20:.0f} MiB" if device.type == "cuda" else ""
        print(f"  memory {name}: peak RSS {results[name]['peak_rss'] / 2 ** 20:.0f} MiB{cuda}", flush=True)
    return results


def memory_probe(request: dict) -> dict:
    """Runs in a fresh process: imports, then build + initialise the trainer, then ``steps`` training steps."""
    import gc

    import torch
    import transformers  # noqa: F401  (the same imports for every trainer: compare weights, not code)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from nnunetv2.run.run_training import get_trainer_from_args  # noqa: F401

    import nnunetv2_llm.trainers  # noqa: F401

    device = torch.device(request["device"])
    configure_torch(device)
    if device.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    peak_imports = peak_rss()
    peak_reset = reset_peak_rss()
    rss_imports = current_rss()
    args = argparse.Namespace(dataset=request["dataset"], plan_preset=request.get("plan_preset"),
                              batch_size=request.get("batch_size"),
                              configuration=request["configuration"], plans=request["plans"], fold=request["fold"])
    trainer = build_trainer(request["trainer"], args, device)
    gc.collect()
    rss_built = current_rss()
    cuda_built = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    batch = synthetic_batch(trainer)
    for _ in range(request["steps"]):
        trainer.train_step(batch)
    sync(device)
    return {
        "rss_after_imports": rss_imports, "peak_rss_imports": peak_imports, "peak_rss_reset": peak_reset,
        "rss_after_build": rss_built,
        "peak_rss": peak_rss(), "rss_end": current_rss(),
        "cuda_allocated_after_build": cuda_built,
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "steps": request["steps"],
    }


def probe_entry(argv: list[str]) -> int:
    """The probe process's command line: ``--memory-probe REQUEST_JSON``; prints the measurement."""
    import json

    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m nnunetv2_llm.tools.benchmark --memory-probe JSON (internal)", file=sys.stderr)
        return 2
    report_measurement(memory_probe(json.loads(argv[1])))
    return 0
