"""``nnunetv2_llm benchmark``: what the LLM block costs next to nnU-Net, measured side by side in one process.

``run_benchmark`` runs the measurements in order; the modules hold them: ``cli`` (arguments, input checks,
environment), ``trainers`` (building trainers, batches), ``plan_presets`` (plans nnU-Net's planner makes for described
datasets: BraTS-sized 3d, large 2d), ``timing`` (training and inference times, paired ratios, verdicts), ``flops``,
``dispatch_counts`` (the operations the block dispatches per step), ``memory`` (the probe in a fresh process, through
``measurement``), ``environment`` (versions, commit), ``report`` (assembling the numbers, rendering markdown).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from nnunetv2_llm.tools.benchmark.dispatch_counts import block_op_counts
from nnunetv2_llm.tools.benchmark.environment import environment_info
from nnunetv2_llm.tools.benchmark.flops import count_flops, layer_linear_class, matmul_rates
from nnunetv2_llm.tools.benchmark.memory import measure_memory
from nnunetv2_llm.tools.benchmark.report import Measurements, assemble
from nnunetv2_llm.tools.benchmark.timing import inference_cases, time_inference, time_training
from nnunetv2_llm.tools.benchmark.trainers import (
    build_trainer,
    choose_device,
    configure_torch,
    draw_batches,
    llm_info,
    parameter_counts,
    plan_info,
)

if TYPE_CHECKING:  # torch and nnU-Net are imported after the environment is set (OpenMP reads it once)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def run_benchmark(args: argparse.Namespace) -> dict:
    """Memory probes, then training steps, inference and FLOPs of every trainer in ``args.trainers``, with ratios
    to the first; the results as written to benchmark.json."""
    import torch

    device = choose_device(args.device)
    configure_torch(device)
    names = list(dict.fromkeys(args.trainers))
    env = environment_info(device)
    what = f"plan preset {args.plan_preset}" if getattr(args, "plan_preset", None) else f"dataset {args.dataset}"
    print(f"benchmark: {', '.join(names)} on {device.type} ({env.get('gpu') or env.get('cpu')}), "
          f"{what} {args.configuration}", flush=True)
    memory = {}
    if args.memory_steps > 0:
        print("memory (one fresh process per trainer):", flush=True)
        memory = measure_memory(names, args, device)

    trainers = _build_trainers(names, args, device)
    first = trainers[names[0]]
    plan = plan_info(first, args.configuration)
    plan["preset"] = getattr(args, "plan_preset", None)
    plan["batch_size_override"] = getattr(args, "batch_size", None)
    llm = {name: info for name, t in trainers.items() if (info := llm_info(t)) is not None}
    params = {name: parameter_counts(t.network) for name, t in trainers.items()}

    print(f"drawing {args.batches} {'synthetic' if args.synthetic_batches else 'real'} batches "
          f"(batch {plan['batch_size']}, patch {plan['patch_size']})", flush=True)
    batches = draw_batches(first, args.batches, args.synthetic_batches, device)
    print(f"training steps: {args.warmup} warm-up + {args.iterations} timed per trainer, alternating", flush=True)
    training = time_training(trainers, batches, args.warmup, args.iterations, device,
                             getattr(args, "nnunet_train_step", False))
    inference_times, case_info = _time_inference(trainers, args, device)
    ops = {name: counts for name, t in trainers.items()
           if (counts := block_op_counts(t, plan["bottleneck_shape"], device)) is not None}
    for name, counts in ops.items():
        print(f"  {name}: the LLM block dispatches {counts['total']} operations per training step "
              f"({counts['forward']} forward, {counts['backward']} backward; {counts['own']} its own, "
              f"{counts['mixer']} the token mixer's)", flush=True)
    flops, rates = {}, {}
    if not args.no_flops:
        print("counting FLOPs of one training step per trainer", flush=True)
        flops = {name: count_flops(t, batches[0], device) for name, t in trainers.items()}
        layers = {name: (p["llm_layer_dtype"], llm.get(name), layer_linear_class(trainers[name].network))
                  for name, p in params.items() if p["llm_layer_dtype"]}
        rates = matmul_rates(layers, flops, device)

    for t in trainers.values():
        t.network.eval()
    results = assemble(Measurements(names, names[0], env, plan, llm, params, training, inference_times, case_info,
                                    flops, rates, memory, ops), args)
    del trainers, first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _build_trainers(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, nnUNetTrainer]:
    print("building trainers:", flush=True)
    trainers = {}
    for name in names:
        start = time.perf_counter()
        trainers[name] = build_trainer(name, args, device)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return trainers


def _time_inference(trainers: dict[str, nnUNetTrainer], args: argparse.Namespace,
                    device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Inference seconds per round and trainer, and the shape of each case; empty when inference is skipped."""
    if args.inference_cases <= 0 or args.inference_repeats <= 0:
        return {}, {}
    cases = inference_cases(next(iter(trainers.values())), args.inference_cases)
    print(f"inference: {len(cases)} cases x {args.inference_repeats} rounds (+1 warm-up), "
          f"mirroring {'off' if args.no_mirroring else 'on'}", flush=True)
    times = time_inference(trainers, cases, args.inference_repeats, device, not args.no_mirroring)
    return times, {k: list(v.shape) for k, v in cases.items()}
