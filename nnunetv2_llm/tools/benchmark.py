"""``nnunetv2_llm benchmark``: what the LLM block costs next to nnU-Net, measured side by side in one process.

For each trainer (built the way ``nnUNetv2_train`` builds it: plans and dataset.json from
``$nnUNet_preprocessed``, trainer class found by nnU-Net's lookup, ``initialize()`` for network, optimizer and
deep-supervision loss) it measures

- the training step: ``trainer.train_step`` (forward, loss, backward, gradient clipping, optimizer step, nnU-Net's
  autocast and GradScaler on CUDA) on real batches drawn once from nnU-Net's own data loader (augmentation
  included) and cached, so data loading is not timed; trainers alternate step by step (order reversed every other
  round) so that machine drift cancels; warm-up rounds are discarded; median, quartiles and paired ratios;
- sliding-window inference: ``nnUNetPredictor.predict_sliding_window_return_logits`` (Gaussian weighting, test-time
  mirroring as nnU-Net's defaults) on a few preprocessed validation cases, same cases for every trainer, alternated;
- peak memory, each trainer in a fresh subprocess (the RSS high-water mark is per process): max RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA, over building the trainer and a few training steps;
- trainable and frozen parameter counts, frozen bytes;
- FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``) for the whole network and for the
  LLM block and its layer, and the floor: the layer's FLOPs at the device's measured matrix-multiply rate.

Writes ``benchmark.json`` (with the raw per-round times) and ``benchmark.md`` to ``--output`` and prints the
table. Step and inference verdicts judge the paired median ratio by its bootstrap 95% CI: ok, OVER, or undecided.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.nnunet_commands import (
    check_device, check_folds, check_trainer_names, dataset_folder, find_trainer_class, is_preprocessed,
    nnunet_dataset_id,
)
from nnunetv2_llm.common.process_memory import current_rss, peak_rss, reset_peak_rss
from nnunetv2_llm.common.report_files import check_report_free, write_json_and_markdown

if TYPE_CHECKING:  # torch and nnU-Net are imported after the environment is set (OpenMP reads it once)
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerLLM", "nnUNetTrainerLLMNoLLM")
STEP_RATIO_TARGET = 1.05
INFERENCE_RATIO_TARGET = 1.05
FLOOR_FACTOR_TARGET = 1.5
# The smallest value of each count option (the benchmark divides by or cycles through these).
COUNT_MINIMUMS = {"--iterations": 1, "--batches": 1, "--warmup": 0, "--inference-cases": 0,
                  "--inference-repeats": 0, "--memory-steps": 0}


# ----------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose validation cases are used for inference")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help="trainer class names; ratios are to the first (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--llm-source", default=None,
                        help="sets nnUNet_LLM_SOURCE for the LLM trainers: a model folder, a .gguf file, or "
                             "synthetic:llama-8b / synthetic:llama-1b (real layer shapes, random bf16 weights, "
                             "written once to $nnUNet_LLM_SYNTHETIC_CACHE or the temp dir); default: as set, else "
                             "the embedded SmolLM2-135M")
    parser.add_argument("--llm-layer", default=None, help="sets nnUNet_LLM_LAYER (default: as set, else the last)")
    parser.add_argument("--iterations", type=int, default=10, help="timed training steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per trainer first")
    parser.add_argument("--batches", type=int, default=2, help="distinct real batches drawn and cycled through")
    parser.add_argument("--synthetic-batches", action="store_true",
                        help="random batches of the planned shape instead of nnU-Net's data loader")
    parser.add_argument("--inference-cases", type=int, default=3,
                        help="preprocessed validation cases per inference round (0: skip inference)")
    parser.add_argument("--inference-repeats", type=int, default=3, help="timed inference rounds")
    parser.add_argument("--no-mirroring", action="store_true", help="inference without test-time mirroring")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="training steps in each memory subprocess (0: skip the memory measurement)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--nnunet-train-step", action="store_true",
                        help="time nnU-Net's own nnUNetTrainer.train_step for every trainer, bypassing trainer-level "
                             "overrides (e.g. the LLM trainers' per-step finite check, which synchronises the GPU "
                             "after the forward pass): isolates what the network itself costs")
    parser.add_argument("--compile", action="store_true",
                        help="nnUNet_compile=true: nnU-Net's torch.compile path (CUDA only; nnU-Net's own default "
                             "on CUDA). Without it nnUNet_compile=false")
    parser.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed folder (default: the variable)")
    parser.add_argument("--output", default="nnunetv2_llm_benchmark", help="folder for benchmark.json/.md")
    parser.add_argument("--overwrite", action="store_true", help="replace benchmark.json/.md already in --output")


def main(args: argparse.Namespace) -> int:
    # The trainers write logs into nnUNet_results/...; keep them out of the user's results, and remove them after.
    with tempfile.TemporaryDirectory(prefix="nnunetv2_llm_benchmark_results_") as trainer_logs:
        _prepare_environment(args, trainer_logs)
        results = run_benchmark(args)
    json_path, md_path = write_json_and_markdown(args.output, "benchmark", results, to_markdown(results))
    print(f"written: {json_path}, {md_path}")
    return 0


def _prepare_environment(args: argparse.Namespace, trainer_logs: str) -> None:
    """Environment for nnU-Net and the LLM trainers; set before torch is imported (OpenMP reads it once)."""
    from nnunetv2_llm.common.environment import ext_trainer_value
    from nnunetv2_llm.common.errors import LLMSettingError
    from nnunetv2_llm.llm.synthetic import resolve_synthetic

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value()
    if args.preprocessed:
        os.environ["nnUNet_preprocessed"] = str(Path(args.preprocessed).resolve())
    if not os.environ.get("nnUNet_preprocessed"):
        raise LLMSettingError("no preprocessed data: set nnUNet_preprocessed or pass --preprocessed "
                              "(`nnunetv2_llm demo` or nnUNetv2_plan_and_preprocess makes it)", "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = trainer_logs
    # Batches are drawn once, in this process: no augmentation workers competing for the cores while timing.
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_compile"] = "true" if args.compile else "false"
    _check_counts(args)
    _check_inputs(args)  # before a synthetic LLM source is written
    source = resolve_synthetic(args.llm_source)
    if source:
        os.environ["nnUNet_LLM_SOURCE"] = source
    if args.llm_layer is not None:
        os.environ["nnUNet_LLM_LAYER"] = str(args.llm_layer)
    _check_llm_choice(args.trainers, source, args.llm_layer)


def _check_counts(args: argparse.Namespace) -> None:
    from nnunetv2_llm.common.errors import LLMSettingError

    for flag, minimum in COUNT_MINIMUMS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < minimum:
            raise LLMSettingError(f"{flag} must be at least {minimum}, got {value}", flag)


def _check_inputs(args: argparse.Namespace) -> None:
    """The dataset, its plans, preprocessed data and fold, every trainer class, the output folder and the device,
    checked before anything is measured."""
    from nnunetv2_llm.common.errors import LLMSettingError

    dataset_id = nnunet_dataset_id(args.dataset)
    folder = dataset_folder(os.environ["nnUNet_preprocessed"], dataset_id)
    if not is_preprocessed(folder, args.configuration, args.plans):  # also false without folder or dataset.json
        where = folder or f"Dataset{dataset_id:03d}_* in {os.environ['nnUNet_preprocessed']}"
        raise LLMSettingError(f"{where} is not preprocessed for {args.plans} {args.configuration}: run "
                              f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c {args.configuration}",
                              "-d / -c / -p / --preprocessed")
    check_folds(folder, [args.fold])
    check_trainer_names(args.trainers)
    check_report_free(args.output, "benchmark", args.overwrite)
    if args.device != "auto":
        check_device(args.device)


def _check_llm_choice(trainers: list[str], source: str | None, layer: str | None) -> None:
    """The LLM source and layer index the LLM trainers will read (config only, no weights), resolved before the first
    memory probe rather than by it."""
    from nnunetv2_llm.model.spec import make_spec
    from nnunetv2_llm.trainers import nnUNetTrainerLLM

    if any(issubclass(find_trainer_class(name), nnUNetTrainerLLM) for name in trainers):
        make_spec("random", source=source, layer=layer)


# ----------------------------------------------------------------------------------------------- building
def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _configure_torch(device: torch.device) -> None:
    """What nnUNetv2_train does before training (run_training.py)."""
    import multiprocessing

    import torch
    from torch.backends import cudnn

    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        cudnn.deterministic = False
        cudnn.benchmark = True


def build_trainer(name: str, args: argparse.Namespace, device: torch.device, quiet: bool = True) -> nnUNetTrainer:
    """The trainer as ``nnUNetv2_train`` builds it, initialised (network, optimizer, loss)."""
    import contextlib
    import io

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed

    torch.manual_seed(0)  # the same U-Net initialisation for every trainer
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        # nnunetv2.run.run_training.get_trainer_from_args, with a robust class lookup
        trainer_class = find_trainer_class(name)
        base = str(dataset_folder(str(nnUNet_preprocessed), nnunet_dataset_id(args.dataset)))
        plans = load_json(join(base, args.plans + ".json"))
        plans["continue_training"] = False
        trainer = trainer_class(plans=plans, configuration=args.configuration, fold=args.fold,
                                dataset_json=load_json(join(base, "dataset.json")), device=device)
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirror axes
    trainer.set_deep_supervision_enabled(True)
    trainer.network.train()
    return trainer


def parameter_counts(network: torch.nn.Module) -> dict[str, int | str | None]:
    from nnunetv2_llm.model.network import unwrap_network

    net = unwrap_network(network)
    trainable = [p for p in net.parameters() if p.requires_grad]
    frozen = [p for p in net.parameters() if not p.requires_grad]
    block = getattr(net, "bottleneck", None)
    mixer = getattr(block, "mixer", None) if block is not None else None
    return {
        "trainable": sum(p.numel() for p in trainable),
        "frozen": sum(p.numel() for p in frozen),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "frozen_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "block_params": sum(p.numel() for p in block.parameters()) if block is not None else 0,
        "llm_layer_params": sum(p.numel() for p in mixer.parameters()) if mixer is not None else 0,
        "llm_layer_dtype": str(next(mixer.parameters()).dtype).removeprefix("torch.")
        if mixer is not None and any(True for _ in mixer.parameters()) else None,
    }


def synthetic_batch(trainer: nnUNetTrainer) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """A random batch of the planned shape: data (B, C, *patch) and deep-supervision targets."""
    import numpy as np
    import torch

    patch = [int(s) for s in trainer.configuration_manager.patch_size]
    batch_size = trainer.batch_size
    data = torch.randn(batch_size, trainer.num_input_channels, *patch)
    labels = trainer.label_manager
    scales = trainer._get_deep_supervision_scales() if trainer.enable_deep_supervision else [[1] * len(patch)]
    targets = []
    for scale in scales:
        shape = [int(np.round(p * s)) for p, s in zip(patch, scale)]
        label_map = torch.tensor(labels.all_labels)[torch.randint(0, len(labels.all_labels), (batch_size, 1, *shape))]
        if labels.has_regions:  # one binary channel per region, as nnU-Net's loader converts region-based targets
            label_map = torch.cat([torch.isin(label_map, torch.tensor(region).flatten())
                                   for region in labels.foreground_regions], 1)
        targets.append(label_map.float())
    return {"data": data, "target": targets if trainer.enable_deep_supervision else targets[0]}


def draw_batches(trainer: nnUNetTrainer, n: int, synthetic: bool, device: torch.device) -> list[dict]:
    """``n`` training batches, drawn once: real ones from nnU-Net's loader (single-threaded), or random."""
    import contextlib
    import io

    if synthetic:
        batches = [synthetic_batch(trainer) for _ in range(n)]
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            loader, val_loader = trainer.get_dataloaders()
        batches = [next(loader) for _ in range(n)]
        for it in (loader, val_loader):
            finish = getattr(it, "_finish", None)
            if finish is not None:
                finish()
    if device.type == "cuda":  # nnU-Net's loader pins memory for CUDA
        batches = [{k: ([t.pin_memory() for t in v] if isinstance(v, list) else v.pin_memory())
                    if k in ("data", "target") else v for k, v in b.items()} for b in batches]
    return batches


# ----------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Alternate trainers; reverse the order every other round so no trainer always runs first or last."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def time_training(trainers: dict[str, nnUNetTrainer], batches: list[dict], warmup: int, iterations: int,
                  device: torch.device, nnunet_step: bool = False) -> dict[str, dict]:
    """Per trainer: the timed ``train_step`` durations (seconds), alternating trainers step by step, and whether its
    network ran compiled (nnU-Net compiles on CUDA only; a failing compile falls back to eager).
    nnunet_step: call nnU-Net's ``nnUNetTrainer.train_step`` instead of the trainer's own override."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_llm.model.network import unwrap_network

    times = {name: [] for name in trainers}
    first = {}
    losses = {name: [] for name in trainers}
    errors = {}
    for r, order in enumerate(_round_orders(list(trainers), warmup + iterations)):
        batch = batches[r % len(batches)]
        for name in order:
            trainer = trainers[name]
            _sync(device)
            start = time.perf_counter()
            step = (lambda b, t=trainer: nnUNetTrainer.train_step(t, b)) if nnunet_step else trainer.train_step
            try:
                out = step(batch)
            except Exception as e:  # e.g. torch.compile failing: fall back to eager, say so
                if unwrap_network(trainer.network) is trainer.network:
                    raise
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"  {name}: the compiled network failed ({errors[name]}); falling back to eager")
                trainer.network = unwrap_network(trainer.network)
                _sync(device)
                start = time.perf_counter()
                out = step(batch)
            _sync(device)
            elapsed = time.perf_counter() - start
            if name not in first:
                first[name] = elapsed
            if r >= warmup:
                times[name].append(elapsed)
            losses[name].append(float(out["loss"]))
        if r == warmup - 1 or r == warmup + iterations - 1 or (r >= warmup and (r - warmup) % 5 == 4):
            done = max(0, r - warmup + 1)
            print(f"  training round {r + 1}/{warmup + iterations} (timed {done})", flush=True)
    compiled = {name: unwrap_network(t.network) is not t.network for name, t in trainers.items()}
    return {"times": times, "first_step_s": first, "losses": losses, "compile_errors": errors, "compiled": compiled}


def inference_cases(trainer: nnUNetTrainer, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` validation cases of the fold (preprocessed), as float tensors (C, *shape)."""
    import contextlib
    import io

    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    with contextlib.redirect_stdout(io.StringIO()):
        _, val_keys = trainer.do_split()
    keys = sorted(val_keys)[:n]
    dataset = infer_dataset_class(trainer.preprocessed_dataset_folder)(trainer.preprocessed_dataset_folder, keys)
    cases = {}
    for key in keys:
        data = dataset.load_case(key)[0]
        cases[key] = torch.from_numpy(np.ascontiguousarray(np.asarray(data[:]), dtype=np.float32))
    return cases


def make_predictor(trainer: nnUNetTrainer, name: str, device: torch.device, mirroring: bool) -> nnUNetPredictor:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=device, verbose=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, name, trainer.inference_allowed_mirroring_axes)
    return predictor


def time_inference(trainers: dict[str, nnUNetTrainer], cases: dict[str, torch.Tensor], repeats: int,
                   device: torch.device, mirroring: bool) -> dict[str, list[float]]:
    """Per trainer: seconds per round (all cases), rounds alternating between trainers, one warm-up round."""
    predictors = {name: make_predictor(t, name, device, mirroring) for name, t in trainers.items()}
    times = {name: [] for name in trainers}
    for t in trainers.values():
        t.set_deep_supervision_enabled(False)
    try:
        for r, order in enumerate(_round_orders(list(trainers), 1 + repeats)):
            for name in order:
                predictor = predictors[name]
                _sync(device)
                start = time.perf_counter()
                for data in cases.values():
                    logits = predictor.predict_sliding_window_return_logits(data)
                    assert logits.shape[1:] == data.shape[1:]
                _sync(device)
                if r > 0:
                    times[name].append(time.perf_counter() - start)
            print(f"  inference round {r + 1}/{1 + repeats}", flush=True)
    finally:
        for t in trainers.values():
            t.set_deep_supervision_enabled(True)
            t.network.train()
    return times


def count_flops(trainer: nnUNetTrainer, batch: dict, device: torch.device) -> dict[str, int | list[int] | None]:
    """FLOPs of one training step's forward + backward (no optimizer step), whole network and LLM block."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunetv2_llm.model.network import unwrap_network

    net = unwrap_network(trainer.network)
    net.train()
    tokens = {}
    hook = None
    block = getattr(net, "bottleneck", None)
    if block is not None:
        hook = block.register_forward_hook(
            lambda m, inp, out: tokens.__setitem__("shape", tuple(inp[0].shape)))
    data = batch["data"].to(device)
    target = [t.to(device) for t in batch["target"]] if isinstance(batch["target"], list) else batch["target"].to(device)
    # Attention is added analytically below: the counter's SDPA formulas assert equal query and key/value heads
    # (grouped-query attention fails, torch 2.11 on CUDA) and the CPU kernel is not counted at all.
    from torch.utils.flop_counter import conv_flop_count, flop_registry

    def no_flops(*args, out_shape=None, **kwargs):
        return 0

    def onednn_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    mapping = {op: no_flops for op in flop_registry if "attention" in str(op)}
    # OneDNNLinear calls oneDNN's convolution directly on CPU, an op the counter has no formula for
    mapping[torch.ops.aten.mkldnn_convolution] = onednn_conv_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    trainer.optimizer.zero_grad(set_to_none=True)
    try:
        with counter:
            with torch.autocast(device.type, enabled=True) if device.type == "cuda" else _null():
                loss = trainer.loss(net(data), target)
            loss.backward()
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.remove()
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    block_flops = max((v for k, v in per_module.items() if k.endswith(".bottleneck")), default=0)
    # A parameter-free mixer (nn.Identity) returns its input tensor itself, which confuses the flop counter's
    # module tracking in backward (later ops get attributed to it): it has no FLOPs of its own.
    mixer = getattr(block, "mixer", None)
    has_layer = mixer is not None and any(True for _ in mixer.parameters())
    layer_flops = max((v for k, v in per_module.items() if k.endswith(".bottleneck.mixer")), default=0) \
        if has_layer else 0
    shape = tokens.get("shape")
    n_tokens = 0
    if shape is not None:
        n_tokens = shape[0]
        for s in shape[2:]:
            n_tokens *= s
    attention_added = 0
    if has_layer and shape is not None:
        attention_added = attention_training_flops(mixer, shape[0], n_tokens // shape[0])
    total = int(counter.get_total_flops()) + attention_added
    return {"total": total, "block": int(block_flops) + attention_added,
            "llm_layer": int(layer_flops) + attention_added, "attention_added_analytically": attention_added,
            "bottleneck_shape": list(shape) if shape else None, "tokens_per_step": int(n_tokens)}


def attention_training_flops(mixer: torch.nn.Module, batch: int, tokens: int) -> int:
    """Attention matmuls of one layer in a training step: forward QK^T and AV (2 x 2 B N^2 H d), backward
    twice that (gradients of inputs only: the weights are frozen). The heads come from the config of the layer's
    attention module (``self_attn`` in decoders, ``attention.self`` in BERT); 0 without a layer (no-LLM control)."""
    layer = getattr(mixer, "layer", None)
    config = next((m.config for m in layer.modules() if hasattr(getattr(m, "config", None), "num_attention_heads")),
                  None) if layer is not None else None
    if config is None:
        return 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 3 * 4 * batch * tokens * tokens * heads * head_dim


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def matmul_rate(device: torch.device, dtype_name: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an (m x k) @ (k x n) product in ``dtype_name`` on ``device`` (median of repeats), run by
    the frozen layer's own linear (``OneDNNLinear``: oneDNN for float32 on CPU, the BLAS otherwise), so that the
    floor uses the rate the layer can reach."""
    import statistics

    import torch

    from nnunetv2_llm.model.onednn_linear import OneDNNLinear

    dtype = getattr(torch, dtype_name)
    a = torch.randn(m, k, device=device).to(dtype)
    linear = OneDNNLinear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    for _ in range(3):
        linear(a)
    _sync(device)
    samples = []
    budget_end = time.perf_counter() + seconds
    while len(samples) < 5 or (time.perf_counter() < budget_end and len(samples) < 200):
        _sync(device)
        start = time.perf_counter()
        linear(a)
        _sync(device)
        samples.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(samples)


# ----------------------------------------------------------------------------------------------- memory (subprocess)
def measure_memory(names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Peak memory of each trainer in a fresh process (same imports everywhere), building it and running steps."""
    results = {}
    for name in names:
        request = {"trainer": name, "dataset": str(args.dataset), "configuration": args.configuration,
                   "plans": args.plans, "fold": args.fold, "device": device.type, "steps": args.memory_steps}
        proc = subprocess.run([sys.executable, "-m", "nnunetv2_llm.tools.benchmark", "--memory-probe", json.dumps(request)],
                              capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("MEMORY_PROBE ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            results[name] = {"error": f"probe exited {proc.returncode}: " + " | ".join(tail)}
            print(f"  memory {name}: failed ({results[name]['error']})")
            continue
        results[name] = json.loads(line[len("MEMORY_PROBE "):])
        print(f"  memory {name}: peak RSS {results[name]['peak_rss'] / 2 ** 20:.0f} MiB"
              + (f", CUDA peak {results[name]['cuda_peak_allocated'] / 2 ** 20:.0f} MiB" if device.type == "cuda" else ""),
              flush=True)
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
    _configure_torch(device)
    if device.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    peak_imports = peak_rss()
    peak_reset = reset_peak_rss()
    rss_imports = current_rss()
    args = argparse.Namespace(dataset=request["dataset"], configuration=request["configuration"],
                              plans=request["plans"], fold=request["fold"])
    trainer = build_trainer(request["trainer"], args, device)
    gc.collect()
    rss_built = current_rss()
    cuda_built = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    batch = synthetic_batch(trainer)
    for _ in range(request["steps"]):
        trainer.train_step(batch)
    _sync(device)
    return {
        "rss_after_imports": rss_imports, "peak_rss_imports": peak_imports, "peak_rss_reset": peak_reset,
        "rss_after_build": rss_built,
        "peak_rss": peak_rss(), "rss_end": current_rss(),
        "cuda_allocated_after_build": cuda_built,
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "steps": request["steps"],
    }


# ----------------------------------------------------------------------------------------------- the run
def _stats(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _paired_ratio(a: list[float], b: list[float]) -> dict:
    """Ratios of times measured in the same round (a[i] / b[i]): drift between rounds cancels. ``ci95``: the
    bootstrap 95% CI of their median (None below 3 rounds)."""
    import numpy as np

    from nnunetv2_llm.evaluation.statistics import median_ci

    if not a or not b:
        return {"median": None, "q25": None, "q75": None, "ci95": None}
    r = np.asarray(a[:len(b)], dtype=float) / np.asarray(b[:len(a)], dtype=float)
    low, high = median_ci(r)
    return {"median": float(np.median(r)), "q25": float(np.percentile(r, 25)), "q75": float(np.percentile(r, 75)),
            "ci95": None if np.isnan(low) else [low, high]}


def _verdict(ratio: float, paired: dict, target: float) -> str:
    """Judge the paired median against ``target`` by its 95% CI: ok (CI at or below), OVER (CI above), else
    undecided; without a CI (fewer than 3 rounds), the ratio of medians decides."""
    if not paired.get("ci95"):
        return f"{ratio:.3f} {'ok' if ratio <= target else 'OVER'} (too few rounds for a CI)"
    low, high = paired["ci95"]
    verdict = "ok" if high <= target else "OVER" if low > target else "undecided"
    return f"{ratio:.3f}, paired {paired['median']:.3f} [95% CI {low:.3f}, {high:.3f}] {verdict}"


def environment_info(device: torch.device) -> dict[str, str | int | None]:
    import datetime
    import platform
    from importlib import metadata

    import torch

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "nnunetv2": version("nnunetv2"), "transformers": version("transformers"),
        "dynamic_network_architectures": version("dynamic_network_architectures"),
        "nnunetv2_llm": version("nnunetv2-llm"), "device": device.type,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
        info["cpu"] = model
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_total"] = torch.cuda.get_device_properties(device).total_memory
    try:
        repo = Path(__file__).resolve().parents[2]
        info["git_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    device = _device(args.device)
    _configure_torch(device)
    names = list(dict.fromkeys(args.trainers))
    baseline = names[0]
    env = environment_info(device)
    print(f"benchmark: {', '.join(names)} on {device.type} ({env.get('gpu') or env.get('cpu')}), "
          f"dataset {args.dataset} {args.configuration}", flush=True)

    memory = {}
    if args.memory_steps > 0:
        print("memory (one fresh process per trainer):", flush=True)
        memory = measure_memory(names, args, device)

    print("building trainers:", flush=True)
    trainers = {}
    for name in names:
        start = time.perf_counter()
        trainers[name] = build_trainer(name, args, device)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    params = {name: parameter_counts(t.network) for name, t in trainers.items()}
    first = trainers[baseline]
    plan = {"patch_size": [int(s) for s in first.configuration_manager.patch_size], "batch_size": first.batch_size,
            "network": first.configuration_manager.network_arch_class_name.split(".")[-1],
            "features_per_stage": first.configuration_manager.network_arch_init_kwargs.get("features_per_stage"),
            "dataset": first.plans_manager.dataset_name, "configuration": args.configuration}
    llm = {}
    for name, t in trainers.items():
        spec = t.plans_manager.plans.get("nnunetv2_llm")
        if spec:
            llm[name] = {k: spec[k] for k in ("mixer", "source", "source_format", "layer", "model_type", "dtype", "rank")}
            llm[name]["width"] = spec["llm_config"]["hidden_size"]
            llm[name]["intermediate"] = spec["llm_config"].get("intermediate_size")

    print(f"drawing {args.batches} {'synthetic' if args.synthetic_batches else 'real'} batches "
          f"(batch {plan['batch_size']}, patch {plan['patch_size']})", flush=True)
    batches = draw_batches(first, args.batches, args.synthetic_batches, device)

    print(f"training steps: {args.warmup} warm-up + {args.iterations} timed per trainer, alternating", flush=True)
    training = time_training(trainers, batches, args.warmup, args.iterations, device,
                             getattr(args, "nnunet_train_step", False))

    inference_times, case_info = {}, {}
    if args.inference_cases > 0 and args.inference_repeats > 0:
        cases = inference_cases(first, args.inference_cases)
        case_info = {k: list(v.shape) for k, v in cases.items()}
        print(f"inference: {len(cases)} cases x {args.inference_repeats} rounds (+1 warm-up), "
              f"mirroring {'off' if args.no_mirroring else 'on'}", flush=True)
        inference_times = time_inference(trainers, cases, args.inference_repeats, device, not args.no_mirroring)

    flops, rates = {}, {}
    if not args.no_flops:
        print("counting FLOPs of one training step per trainer", flush=True)
        flops = {name: count_flops(t, batches[0], device) for name, t in trainers.items()}
        for name, p in params.items():
            dtype = p["llm_layer_dtype"]
            if dtype and dtype not in rates:
                width = llm.get(name, {}).get("width", 1024)
                tokens = max((f["tokens_per_step"] for f in flops.values()), default=1024) or 1024
                inter = llm.get(name, {}).get("intermediate") or 4 * width
                big = 8192 if device.type == "cuda" else 2048
                rates[dtype] = {
                    "layer_shape": [tokens, width, inter],
                    "layer_shape_flops_per_s": matmul_rate(device, dtype, tokens, width, inter),
                    "square": big, "square_flops_per_s": matmul_rate(device, dtype, big, big, big),
                }
                rates[dtype]["peak_flops_per_s"] = max(rates[dtype]["layer_shape_flops_per_s"],
                                                       rates[dtype]["square_flops_per_s"])

    for t in trainers.values():
        t.network.eval()
    results = assemble(names, baseline, env, plan, llm, params, training, inference_times, case_info, flops, rates,
                       memory, args)
    del trainers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def assemble(names: list[str], baseline: str, env: dict, plan: dict, llm: dict, params: dict, training: dict,
             inference_times: dict[str, list[float]], case_info: dict[str, list[int]], flops: dict, rates: dict,
             memory: dict, args: argparse.Namespace) -> dict:
    """All numbers, with ratios to the baseline computed from the medians stored beside them."""
    step = {n: _stats(training["times"][n]) for n in names}
    inf = {n: _stats(inference_times.get(n, [])) for n in names}
    base_step = step[baseline]["median"]
    base_inf = inf[baseline]["median"]
    base_mem = memory.get(baseline, {})
    per_trainer = {}
    for n in names:
        row = {
            "step_s": step[n],
            "step_ratio": step[n]["median"] / base_step if base_step else None,
            "step_paired_ratio": _paired_ratio(training["times"][n], training["times"][baseline]),
            "step_extra_s": step[n]["median"] - base_step if base_step is not None else None,
            "step_times_s": training["times"][n],  # per timed round, in order: for re-analysis
            "inference_times_s": inference_times.get(n, []),
            "first_step_s": training["first_step_s"].get(n),
            "compile_error": training["compile_errors"].get(n),
            "compiled": training["compiled"][n],
            "last_loss": training["losses"][n][-1] if training["losses"][n] else None,
            "inference_s": inf[n],
            "inference_ratio": (inf[n]["median"] / base_inf) if base_inf and inf[n]["median"] is not None else None,
            "inference_paired_ratio": _paired_ratio(inference_times.get(n, []), inference_times.get(baseline, [])),
            "params": params[n],
            "llm": llm.get(n),
        }
        mem = memory.get(n)
        if mem is not None:
            row["memory"] = dict(mem)
            row["memory"].update(_memory_over(mem, base_mem, "overhead"))
            if (llm.get(n) or {}).get("mixer") == "pretrained":
                control = next((memory.get(c) for c in names if (llm.get(c) or {}).get("mixer") == "identity"), None)
                row["memory"].update(_memory_over(mem, control, "over_no_llm_control"))
        f = flops.get(n)
        if f is not None:
            row["flops"] = dict(f)
            base_total = flops[baseline]["total"]
            row["flops"]["ratio"] = f["total"] / base_total if base_total else None
            row["flops"]["layer_share_of_baseline"] = f["llm_layer"] / base_total if base_total else None
            dtype = params[n]["llm_layer_dtype"]
            if dtype in rates and f["llm_layer"]:
                floor = f["llm_layer"] / rates[dtype]["peak_flops_per_s"]
                row["floor_extra_s"] = floor
                row["extra_over_floor"] = row["step_extra_s"] / floor if row["step_extra_s"] is not None else None
        per_trainer[n] = row
    return {"environment": env, "plan": plan, "baseline": baseline, "trainers": names,
            "settings": {"iterations": args.iterations, "warmup": args.warmup, "batches": args.batches,
                         "batch_source": "synthetic" if args.synthetic_batches else "nnU-Net data loader (cached)",
                         "inference_cases": case_info, "inference_repeats": args.inference_repeats,
                         "mirroring": not args.no_mirroring, "compile_requested": bool(args.compile),
                         "train_step": "nnUNetTrainer.train_step for all" if getattr(args, "nnunet_train_step", False)
                         else "each trainer's own",
                         "memory_steps": args.memory_steps},
            "matmul_rates": rates, "results": per_trainer,
            "targets": {"step_ratio": STEP_RATIO_TARGET, "inference_ratio": INFERENCE_RATIO_TARGET,
                        "extra_over_floor": FLOOR_FACTOR_TARGET}}


def _memory_over(mem: dict, other: dict | None, suffix: str) -> dict:
    """Memory figures of one probe minus another's (``{key}_{suffix}``); empty when either failed or is missing."""
    if not other or "error" in mem or "error" in other:
        return {}
    return {f"{key}_{suffix}": mem[key] - other[key]
            for key in ("peak_rss", "rss_after_build", "cuda_peak_allocated", "cuda_allocated_after_build")}


# ----------------------------------------------------------------------------------------------- report
def _fmt(value, spec=".3f", none="-"):
    return none if value is None else format(value, spec)


def _mib(value):
    return "-" if value is None else f"{value / 2 ** 20:.0f}"


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
    env, plan, s = results["environment"], results["plan"], results["settings"]
    device = env.get("gpu") or env.get("cpu") or env["device"]
    lines = [
        f"# nnunetv2_llm benchmark: {plan['dataset']} {plan['configuration']}",
        "",
        f"- date {env['date']}; device {env['device']} ({device}); torch {env['torch']} ({env['torch_threads']} "
        f"threads), nnunetv2 {env['nnunetv2']}, transformers {env['transformers']}, Python {env['python']}"
        + (f", CUDA {env.get('cuda')}" if env["device"] == "cuda" else "") + f"; commit {env.get('git_commit')}",
        f"- plans: {plan['network']} {plan['features_per_stage']}, patch {plan['patch_size']}, batch {plan['batch_size']}",
        f"- training: {s['warmup']} warm-up + {s['iterations']} timed steps per trainer, alternating (order reversed "
        f"every other round); batches: {s['batch_source']}, {s['batches']} distinct; torch.compile "
        f"{_compile_state(results)}; train_step: {s.get('train_step', 'each trainer')}",
        f"- inference: {len(s['inference_cases'])} cases {list(s['inference_cases'].values())[:3]}, "
        f"{s['inference_repeats']} rounds, mirroring {'on' if s['mirroring'] else 'off'}",
    ]
    for name, info in ((n, r["llm"]) for n, r in results["results"].items() if r["llm"]):
        lines.append(f"- {name}: mixer {info['mixer']}, {info['model_type']} layer {info['layer']} "
                     f"(width {info['width']}, {info['dtype']}, {info['source_format']}) from {info['source']}")
    peak, built = (("cuda_peak_allocated", "cuda_allocated_after_build") if env["device"] == "cuda"
                   else ("peak_rss", "rss_after_build"))
    lines += ["", "| trainer | step s (median [q25, q75]) | step ratio (paired) | inference s | inference ratio | "
                  "peak mem MiB (over base; over base after building) | trainable | frozen (MiB) | GFLOP/step | "
                  "FLOP ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["results"].items():
        st, inf = r["step_s"], r["inference_s"]
        mem = r.get("memory", {})
        if "error" in mem:
            mem_text = "failed"
        elif mem:
            mem_text = _mib(mem[peak])
            if f"{peak}_overhead" in mem and name != results["baseline"]:
                mem_text += f" ({mem[f'{peak}_overhead'] / 2 ** 20:+.0f}; {mem[f'{built}_overhead'] / 2 ** 20:+.0f})"
        else:
            mem_text = "-"
        p = r["params"]
        fl = r.get("flops", {})
        lines.append(
            f"| {name} | {_fmt(st['median'])} [{_fmt(st['q25'])}, {_fmt(st['q75'])}] | "
            f"{_fmt(r['step_ratio'])} ({_fmt(r['step_paired_ratio']['median'])}) | {_fmt(inf['median'])} | "
            f"{_fmt(r['inference_ratio'])} | {mem_text} | {p['trainable']:,} | {p['frozen']:,} "
            f"({_mib(p['frozen_bytes'])}) | {_fmt(fl.get('total', None) and fl['total'] / 1e9, '.1f')} | "
            f"{_fmt(fl.get('ratio'), '.4f')} |")
    lines.append("")
    for name, r in results["results"].items():
        fl = r.get("flops")
        if not fl or not fl.get("llm_layer"):
            continue
        dtype = r["params"]["llm_layer_dtype"]
        rate = results["matmul_rates"].get(dtype, {})
        lines.append(
            f"- {name}: LLM block {fl['block'] / 1e9:.1f} GFLOP/step, of which the layer {fl['llm_layer'] / 1e9:.1f} "
            f"({fl['tokens_per_step']} tokens/step, bottleneck {fl['bottleneck_shape']}); layer / baseline network "
            f"FLOPs {fl['layer_share_of_baseline']:.4f}; floor = layer FLOPs at the measured {dtype} matmul rate "
            f"({rate.get('peak_flops_per_s', 0) / 1e12:.2f} TFLOP/s) = {_fmt(r.get('floor_extra_s'), '.4f')} s; "
            f"measured extra {_fmt(r['step_extra_s'], '.4f')} s = {_fmt(r.get('extra_over_floor'), '.2f')} x floor")
        if r.get("compile_error"):
            lines.append(f"- {name}: torch.compile failed, measured eager: {r['compile_error']}")
    for name, r in results["results"].items():
        mem = r.get("memory", {})
        if f"{built}_over_no_llm_control" in mem:
            frozen = r["params"]["frozen_bytes"]
            over = mem[f"{built}_over_no_llm_control"]
            lines.append(
                f"- {name}: memory over the no-LLM control (same wrapper, same source config read), which isolates the "
                f"frozen layer: after building {over / 2 ** 20:+.1f} MiB = {over / frozen:.2f} x the layer's "
                f"{frozen / 2 ** 20:.1f} MiB; peak {mem[f'{peak}_over_no_llm_control'] / 2 ** 20:+.0f} MiB")
    lines += ["", "Targets: step ratio <= %.2f, inference ratio <= %.2f, extra step time <= %.1f x floor (large "
              "layers on GPU); peak memory overhead = frozen layer bytes + activations. Step and inference verdicts "
              "judge the paired median ratio by its 95%% bootstrap CI: ok, OVER, or undecided when the CI spans the "
              "target (more --iterations or --inference-repeats narrow it)." % (
                  STEP_RATIO_TARGET, INFERENCE_RATIO_TARGET, FLOOR_FACTOR_TARGET)]
    verdicts = []
    for name, r in results["results"].items():
        if name == results["baseline"]:
            continue
        checks = []
        if r["step_ratio"] is not None:
            checks.append("step " + _verdict(r["step_ratio"], r["step_paired_ratio"], STEP_RATIO_TARGET))
        if r["inference_ratio"] is not None:
            checks.append("inference " + _verdict(r["inference_ratio"], r["inference_paired_ratio"],
                                                  INFERENCE_RATIO_TARGET))
        if r.get("extra_over_floor") is not None:
            verdict = (("ok" if r["extra_over_floor"] <= FLOOR_FACTOR_TARGET else "OVER") if env["device"] == "cuda"
                       else "(a GPU target)")
            checks.append(f"extra/floor {r['extra_over_floor']:.2f} {verdict}")
        verdicts.append(f"- {name}: " + ", ".join(checks))
    lines += verdicts
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- probe entry
def _probe_entry(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m nnunetv2_llm.tools.benchmark --memory-probe JSON (internal)", file=sys.stderr)
        return 2
    result = memory_probe(json.loads(argv[1]))
    print("MEMORY_PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_probe_entry(sys.argv[1:]))
