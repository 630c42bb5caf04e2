"""The benchmark's results: every number assembled with its ratios to the baseline (``assemble``, for
benchmark.json), and the markdown rendered from them (``to_markdown``, for benchmark.md and the terminal)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from nnunetv2_llm.tools.benchmark.timing import paired_ratio, summary_stats, verdict

STEP_RATIO_TARGET = 1.05
INFERENCE_RATIO_TARGET = 1.05
FLOOR_FACTOR_TARGET = 1.5
MIB = 2 ** 20


@dataclass
class Measurements:
    """What one benchmark run measured, per trainer name (``names``, ratios are to ``baseline``)."""

    names: list[str]
    baseline: str
    environment: dict
    plan: dict
    llm: dict[str, dict]  # trainers with an LLM block only
    params: dict[str, dict]
    training: dict  # time_training's result
    inference_times: dict[str, list[float]]
    case_info: dict[str, list[int]]  # inference case -> its shape
    flops: dict[str, dict]
    rates: dict[str, dict]  # matmul rates per layer dtype
    memory: dict[str, dict]
    block_ops: dict[str, dict] = field(default_factory=dict)  # dispatch_counts.block_op_counts, trainers with a block


# ----------------------------------------------------------------------------------------------- compute
def assemble(m: Measurements, args: argparse.Namespace) -> dict:
    """All numbers, with ratios to the baseline computed from the medians stored beside them."""
    per_trainer = {n: _timing_row(m, n) for n in m.names}
    for n, row in per_trainer.items():
        row["params"] = m.params[n]
        row["llm"] = m.llm.get(n)
        if m.memory.get(n) is not None:
            row["memory"] = _memory_row(m, n)
        if m.flops.get(n) is not None:
            row.update(_flops_row(m, n, row["step_extra_s"]))
        if m.block_ops.get(n) is not None:
            row["block_ops"] = m.block_ops[n]
    return {"environment": m.environment, "plan": m.plan, "baseline": m.baseline, "trainers": m.names,
            "settings": _settings(m.case_info, args), "matmul_rates": m.rates, "results": per_trainer,
            "targets": {"step_ratio": STEP_RATIO_TARGET, "inference_ratio": INFERENCE_RATIO_TARGET,
                        "extra_over_floor": FLOOR_FACTOR_TARGET}}


def _timing_row(m: Measurements, n: str) -> dict:
    """Step and inference times of trainer ``n``: statistics, ratios of medians, paired ratios, raw times."""
    training, inference_times = m.training, m.inference_times
    step, base_step = summary_stats(training["times"][n]), summary_stats(training["times"][m.baseline])["median"]
    inf = summary_stats(inference_times.get(n, []))
    base_inf = summary_stats(inference_times.get(m.baseline, []))["median"]
    return {
        "step_s": step,
        "step_ratio": step["median"] / base_step if base_step else None,
        "step_paired_ratio": paired_ratio(training["times"][n], training["times"][m.baseline]),
        "step_extra_s": step["median"] - base_step if base_step is not None else None,
        "step_times_s": training["times"][n],  # per timed round, in order: for re-analysis
        "inference_times_s": inference_times.get(n, []),
        "first_step_s": training["first_step_s"].get(n),
        "compile_error": training["compile_errors"].get(n),
        "compiled": training["compiled"][n],
        "last_loss": training["losses"][n][-1] if training["losses"][n] else None,
        "inference_s": inf,
        "inference_ratio": (inf["median"] / base_inf) if base_inf and inf["median"] is not None else None,
        "inference_paired_ratio": paired_ratio(inference_times.get(n, []), inference_times.get(m.baseline, [])),
    }


def _memory_row(m: Measurements, n: str) -> dict:
    """Trainer ``n``'s memory probe, plus its excess over the baseline and, for a pre-trained layer, over the
    no-LLM control (the first identity-mixer trainer)."""
    mem = m.memory[n]
    row = dict(mem)
    row.update(_memory_over(mem, m.memory.get(m.baseline, {}), "overhead"))
    if (m.llm.get(n) or {}).get("mixer") == "pretrained":
        control = next((m.memory.get(c) for c in m.names if (m.llm.get(c) or {}).get("mixer") == "identity"), None)
        row.update(_memory_over(mem, control, "over_no_llm_control"))
    return row


def _memory_over(mem: dict, other: dict | None, suffix: str) -> dict:
    """Memory figures of one probe minus another's (``{key}_{suffix}``); empty when either failed or is missing."""
    if not other or "error" in mem or "error" in other:
        return {}
    return {f"{key}_{suffix}": mem[key] - other[key]
            for key in ("peak_rss", "rss_after_build", "cuda_peak_allocated", "cuda_allocated_after_build")}


def _flops_row(m: Measurements, n: str, step_extra_s: float | None) -> dict:
    """``flops`` of trainer ``n`` with its ratios to the baseline's, and the floor: the layer's FLOPs at the
    measured matmul rate of its dtype, and the measured extra step time over it."""
    f = m.flops[n]
    base_total = m.flops[m.baseline]["total"]
    row = {"flops": {**f, "ratio": f["total"] / base_total if base_total else None,
                     "layer_share_of_baseline": f["llm_layer"] / base_total if base_total else None,
                     "block_share": f["block"] / f["total"] if f["total"] else None}}
    dtype = m.params[n]["llm_layer_dtype"]
    if dtype in m.rates and f["llm_layer"]:
        floor = f["llm_layer"] / m.rates[dtype]["peak_flops_per_s"]
        row["floor_extra_s"] = floor
        row["extra_over_floor"] = step_extra_s / floor if step_extra_s is not None else None
    return row


def _settings(case_info: dict[str, list[int]], args: argparse.Namespace) -> dict:
    return {"iterations": args.iterations, "warmup": args.warmup, "batches": args.batches,
            "batch_source": "synthetic" if args.synthetic_batches else "nnU-Net data loader (cached)",
            "inference_cases": case_info, "inference_repeats": args.inference_repeats,
            "mirroring": not args.no_mirroring, "compile_requested": bool(args.compile),
            "train_step": "nnUNetTrainer.train_step for all" if getattr(args, "nnunet_train_step", False)
            else "each trainer's own",
            "memory_steps": args.memory_steps}


# ----------------------------------------------------------------------------------------------- render
def _fmt(value, spec=".3f", none="-"):
    return none if value is None else format(value, spec)


def _mib(value):
    return "-" if value is None else f"{value / MIB:.0f}"


def _memory_keys(results: dict) -> tuple[str, str]:
    """The peak and after-building memory keys of the device: CUDA allocations on CUDA, RSS on CPU."""
    if results["environment"]["device"] == "cuda":
        return "cuda_peak_allocated", "cuda_allocated_after_build"
    return "peak_rss", "rss_after_build"


def _compile_state(results: dict) -> str:
    """Whether the timed networks ran compiled, not just whether --compile asked for it."""
    compiled = [name for name, r in results["results"].items() if r["compiled"]]
    if len(compiled) == len(results["results"]):
        return "on"
    if compiled:
        return f"on for {', '.join(compiled)} only"
    return ("off (requested, but not used: nnU-Net compiles on CUDA only, and a failing compile runs eager)"
            if results["settings"]["compile_requested"] else "off")


def to_markdown(results: dict) -> str:
    """benchmark.md: settings, one table row per trainer, the LLM block's FLOPs and memory, targets, verdicts."""
    lines = (_header_lines(results) + _table_lines(results) + _flops_lines(results) + _ops_lines(results)
             + _memory_lines(results) + _verdict_lines(results))
    return "\n".join(lines) + "\n"


def _header_lines(results: dict) -> list[str]:
    env, plan, s = results["environment"], results["plan"], results["settings"]
    device = env.get("gpu") or env.get("cpu") or env["device"]
    lines = [
        f"# nnunetv2_llm benchmark: {plan['dataset']} {plan['configuration']}",
        "",
        f"- date {env['date']}; device {env['device']} ({device}); torch {env['torch']} ({env['torch_threads']} "
        f"threads), nnunetv2 {env['nnunetv2']}, transformers {env['transformers']}, Python {env['python']}"
        + (f", CUDA {env.get('cuda')}" if env["device"] == "cuda" else "") + f"; commit {env.get('git_commit')}",
        f"- plans: {plan['network']} {plan['features_per_stage']}, patch {plan['patch_size']}, "
        f"batch {plan['batch_size']}{' (--batch-size; not as planned)' if plan.get('batch_size_override') else ''}, "
        f"bottleneck {plan.get('bottleneck_shape')}"
        + (f" (preset {plan['preset']}: nnU-Net's planner on a described dataset, synthetic batches)"
           if plan.get("preset") else ""),
        f"- training: {s['warmup']} warm-up + {s['iterations']} timed steps per trainer, alternating (order reversed "
        f"every other round); batches: {s['batch_source']}, {s['batches']} distinct; torch.compile "
        f"{_compile_state(results)}; train_step: {s.get('train_step', 'each trainer')}",
        f"- inference: {len(s['inference_cases'])} cases {list(s['inference_cases'].values())[:3]}, "
        f"{s['inference_repeats']} rounds, mirroring {'on' if s['mirroring'] else 'off'}",
    ]
    for name, info in ((n, r["llm"]) for n, r in results["results"].items() if r["llm"]):
        lines.append(f"- {name}: mixer {info['mixer']}, {info['model_type']} layer {info['layer']} "
                     f"(width {info['width']}, {info['dtype']}, {info['source_format']}) from {info['source']}")
    return lines


def _memory_cell(results: dict, name: str, mem: dict) -> str:
    """Peak memory in MiB, with its excess over the baseline at the peak and after building."""
    peak, built = _memory_keys(results)
    if "error" in mem:
        return "failed"
    if not mem:
        return "-"
    text = _mib(mem[peak])
    if f"{peak}_overhead" in mem and name != results["baseline"]:
        text += f" ({mem[f'{peak}_overhead'] / MIB:+.0f}; {mem[f'{built}_overhead'] / MIB:+.0f})"
    return text


def _table_lines(results: dict) -> list[str]:
    lines = ["", "| trainer | step s (median [q25, q75]) | step ratio (paired) | inference s | inference ratio | "
                 "peak mem MiB (over base; over base after building) | trainable | frozen (MiB) | GFLOP/step | "
                 "FLOP ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["results"].items():
        st, inf, p, fl = r["step_s"], r["inference_s"], r["params"], r.get("flops", {})
        lines.append(
            f"| {name} | {_fmt(st['median'])} [{_fmt(st['q25'])}, {_fmt(st['q75'])}] | "
            f"{_fmt(r['step_ratio'])} ({_fmt(r['step_paired_ratio']['median'])}) | {_fmt(inf['median'])} | "
            f"{_fmt(r['inference_ratio'])} | {_memory_cell(results, name, r.get('memory', {}))} | "
            f"{p['trainable']:,} | {p['frozen']:,} ({_mib(p['frozen_bytes'])}) | "
            f"{_fmt(fl.get('total', None) and fl['total'] / 1e9, '.1f')} | {_fmt(fl.get('ratio'), '.4f')} |")
    lines.append("")
    return lines


def _flops_lines(results: dict) -> list[str]:
    lines = []
    for name, r in results["results"].items():
        fl = r.get("flops")
        if not fl or not fl.get("llm_layer"):
            continue
        dtype = r["params"]["llm_layer_dtype"]
        rate = results["matmul_rates"].get(dtype, {})
        lines.append(
            f"- {name}: LLM block {fl['block'] / 1e9:.1f} GFLOP/step ({fl['block_share']:.4f} of the network's), "
            f"of which the layer "
            f"{fl['llm_layer'] / 1e9:.1f} ({fl['tokens_per_step']} tokens/step, bottleneck {fl['bottleneck_shape']}); "
            f"layer / baseline network FLOPs {fl['layer_share_of_baseline']:.4f}; "
            f"floor = layer FLOPs at the measured {dtype} matmul rate "
            f"({rate.get('peak_flops_per_s', 0) / 1e12:.2f} TFLOP/s) = {_fmt(r.get('floor_extra_s'), '.4f')} s; "
            f"measured extra {_fmt(r['step_extra_s'], '.4f')} s = {_fmt(r.get('extra_over_floor'), '.2f')} x floor")
        if r.get("compile_error"):
            lines.append(f"- {name}: torch.compile failed, measured eager: {r['compile_error']}")
    return lines


def _ops_lines(results: dict) -> list[str]:
    """Per trainer with a block: the operations it dispatches in a training step."""
    lines = []
    for name, r in results["results"].items():
        ops = r.get("block_ops")
        if ops:
            lines.append(f"- {name}: the LLM block dispatches {ops['total']} operations per training step "
                         f"({ops['forward']} forward, {ops['backward']} backward); {ops['own']} its own, "
                         f"{ops['mixer']} the token mixer's")
    return lines


def _memory_lines(results: dict) -> list[str]:
    peak, built = _memory_keys(results)
    lines = []
    for name, r in results["results"].items():
        mem = r.get("memory", {})
        if f"{built}_over_no_llm_control" in mem:
            frozen = r["params"]["frozen_bytes"]
            over = mem[f"{built}_over_no_llm_control"]
            lines.append(
                f"- {name}: memory over the no-LLM control (same wrapper, same source config read), which isolates the "
                f"frozen layer: after building {over / MIB:+.1f} MiB = {over / frozen:.2f} x the layer's "
                f"{frozen / MIB:.1f} MiB; peak {mem[f'{peak}_over_no_llm_control'] / MIB:+.0f} MiB")
    return lines


def _verdict_lines(results: dict) -> list[str]:
    """The targets, then per trainer other than the baseline: step, inference and floor verdicts."""
    lines = ["", "Targets: step ratio <= %.2f, inference ratio <= %.2f, extra step time <= %.1f x floor (large "
             "layers on GPU); peak memory overhead = frozen layer bytes + activations. Step and inference verdicts "
             "judge the paired median ratio by its 95%% bootstrap CI: ok, OVER, or undecided when the CI spans the "
             "target (more --iterations or --inference-repeats narrow it)." % (
                 STEP_RATIO_TARGET, INFERENCE_RATIO_TARGET, FLOOR_FACTOR_TARGET)]
    on_cuda = results["environment"]["device"] == "cuda"
    for name, r in results["results"].items():
        if name == results["baseline"]:
            continue
        checks = []
        if r["step_ratio"] is not None:
            checks.append("step " + verdict(r["step_ratio"], r["step_paired_ratio"], STEP_RATIO_TARGET))
        if r["inference_ratio"] is not None:
            checks.append("inference " + verdict(r["inference_ratio"], r["inference_paired_ratio"],
                                                 INFERENCE_RATIO_TARGET))
        if r.get("extra_over_floor") is not None:
            judged = ("ok" if r["extra_over_floor"] <= FLOOR_FACTOR_TARGET else "OVER") if on_cuda else "(a GPU target)"
            checks.append(f"extra/floor {r['extra_over_floor']:.2f} {judged}")
        lines.append(f"- {name}: " + ", ".join(checks))
    return lines
