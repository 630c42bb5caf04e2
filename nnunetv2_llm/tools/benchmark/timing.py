"""Training-step and sliding-window inference times, trainers alternating round by round, and what they say:
medians and quartiles, ratios of times paired by round, and verdicts against a target."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from nnunetv2_llm.tools.benchmark.trainers import sync

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Alternate trainers; reverse the order every other round so no trainer always runs first or last."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def _step_function(trainer: nnUNetTrainer, nnunet_step: bool) -> Callable[[dict], dict]:
    """The trainer's own ``train_step``, or nnU-Net's ``nnUNetTrainer.train_step`` bypassing its overrides."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return (lambda b: nnUNetTrainer.train_step(trainer, b)) if nnunet_step else trainer.train_step


def _timed_step(name: str, trainer: nnUNetTrainer, batch: dict, device: torch.device, nnunet_step: bool,
                errors: dict[str, str]) -> tuple[float, dict]:
    """Seconds and output of one training step. A compiled network that fails is unwrapped and the step run again
    eagerly (recorded in ``errors``); an eager network's failure is raised."""
    from nnunetv2_llm.model.network import unwrap_network

    sync(device)
    start = time.perf_counter()
    try:
        out = _step_function(trainer, nnunet_step)(batch)
    except Exception as e:  # e.g. torch.compile failing: fall back to eager, say so
        if unwrap_network(trainer.network) is trainer.network:
            raise
        errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"  {name}: the compiled network failed ({errors[name]}); falling back to eager")
        trainer.network = unwrap_network(trainer.network)
        sync(device)
        start = time.perf_counter()
        out = _step_function(trainer, nnunet_step)(batch)
    sync(device)
    return time.perf_counter() - start, out


def time_training(trainers: dict[str, nnUNetTrainer], batches: list[dict], warmup: int, iterations: int,
                  device: torch.device, nnunet_step: bool = False) -> dict[str, dict]:
    """Per trainer: the timed ``train_step`` durations (seconds), alternating trainers step by step, and whether its
    network ran compiled (nnU-Net compiles on CUDA only; a failing compile falls back to eager).
    nnunet_step: call nnU-Net's ``nnUNetTrainer.train_step`` instead of the trainer's own override."""
    from nnunetv2_llm.model.network import unwrap_network

    times = {name: [] for name in trainers}
    first = {}
    losses = {name: [] for name in trainers}
    errors = {}
    for r, order in enumerate(round_orders(list(trainers), warmup + iterations)):
        batch = batches[r % len(batches)]
        for name in order:
            elapsed, out = _timed_step(name, trainers[name], batch, device, nnunet_step, errors)
            first.setdefault(name, elapsed)
            if r >= warmup:
                times[name].append(elapsed)
            losses[name].append(float(out["loss"]))
        if r == warmup - 1 or r == warmup + iterations - 1 or (r >= warmup and (r - warmup) % 5 == 4):
            print(f"  training round {r + 1}/{warmup + iterations} (timed {max(0, r - warmup + 1)})", flush=True)
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
    """nnU-Net's predictor around the trainer's network, with nnU-Net's default sliding-window settings."""
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
        for r, order in enumerate(round_orders(list(trainers), 1 + repeats)):
            for name in order:
                predictor = predictors[name]
                sync(device)
                start = time.perf_counter()
                for data in cases.values():
                    logits = predictor.predict_sliding_window_return_logits(data)
                    assert logits.shape[1:] == data.shape[1:]
                sync(device)
                if r > 0:
                    times[name].append(time.perf_counter() - start)
            print(f"  inference round {r + 1}/{1 + repeats}", flush=True)
    finally:
        for t in trainers.values():
            t.set_deep_supervision_enabled(True)
            t.network.train()
    return times


def summary_stats(values: list[float]) -> dict:
    """Median, quartiles, min, max and count of ``values`` (None for each when empty)."""
    import numpy as np

    if not values:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def paired_ratio(a: list[float], b: list[float]) -> dict:
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


def verdict(ratio: float, paired: dict, target: float) -> str:
    """Judge the paired median against ``target`` by its 95% CI: ok (CI at or below), OVER (CI above), else
    undecided; without a CI (fewer than 3 rounds), the ratio of medians decides."""
    if not paired.get("ci95"):
        return f"{ratio:.3f} {'ok' if ratio <= target else 'OVER'} (too few rounds for a CI)"
    low, high = paired["ci95"]
    decision = "ok" if high <= target else "OVER" if low > target else "undecided"
    return f"{ratio:.3f}, paired {paired['median']:.3f} [95% CI {low:.3f}, {high:.3f}] {decision}"
