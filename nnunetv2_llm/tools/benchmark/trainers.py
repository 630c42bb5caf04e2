"""The trainers as ``nnUNetv2_train`` builds them, what they hold, and the batches they are timed on."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nnunetv2_llm.common.nnunet_commands import dataset_folder, find_trainer_class, nnunet_dataset_id
from nnunetv2_llm.tools.benchmark.plan_presets import DatasetDescription, plan_preset

if TYPE_CHECKING:  # torch and nnU-Net are imported after the environment is set (OpenMP reads it once)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def choose_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def configure_torch(device: torch.device) -> None:
    """What nnUNetv2_train does before training (run_training.py)."""
    import multiprocessing

    import torch
    from torch.backends import cudnn

    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        cudnn.deterministic = False
        cudnn.benchmark = True


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards includes it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainer(name: str, args: argparse.Namespace, device: torch.device, quiet: bool = True) -> nnUNetTrainer:
    """The trainer as ``nnUNetv2_train`` builds it, initialised (network, optimizer, loss)."""
    import io

    import torch

    torch.manual_seed(0)  # the same U-Net initialisation for every trainer
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        # nnunetv2.run.run_training.get_trainer_from_args, with a robust class lookup
        trainer_class = find_trainer_class(name)
        plans, dataset_json = load_plans(args)
        plans["continue_training"] = False
        trainer = trainer_class(plans=plans, configuration=args.configuration, fold=args.fold,
                                dataset_json=dataset_json, device=device)
        with _no_dataset_files() if getattr(args, "plan_preset", None) else contextlib.nullcontext():
            trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirror axes
    trainer.set_deep_supervision_enabled(True)
    trainer.network.train()
    return trainer


@contextlib.contextmanager
def _no_dataset_files() -> Iterator[None]:
    """``initialize()`` picks the dataset class from the preprocessed files' ending; a plan preset has no files and its
    batches are synthetic, so the class is never used: nnU-Net's default (blosc2) is named instead."""
    from unittest import mock

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    with mock.patch("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class",
                    lambda folder: nnUNetDatasetBlosc2):
        yield


def load_plans(args: argparse.Namespace) -> tuple[dict, dict]:
    """The plans and dataset.json to build trainers from: a ``--plan-preset``'s (planned by nnU-Net's planner, no
    data needed) or the preprocessed dataset's, with ``--batch-size`` replacing the planned batch size. A fresh copy
    on every call (trainers write into their plans)."""
    import copy

    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed

    preset = getattr(args, "plan_preset", None)
    if preset:
        plans, dataset_json, _ = _planned(preset)
        plans, dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    else:
        base = str(dataset_folder(str(nnUNet_preprocessed), nnunet_dataset_id(args.dataset)))
        plans, dataset_json = load_json(join(base, args.plans + ".json")), load_json(join(base, "dataset.json"))
    if getattr(args, "batch_size", None):
        plans["configurations"][args.configuration]["batch_size"] = args.batch_size
    return plans, dataset_json


@functools.lru_cache(maxsize=4)
def _planned(preset: str) -> tuple[dict, dict, DatasetDescription]:
    """nnU-Net's planner is run once per preset and process (it estimates memory of candidate networks)."""
    return plan_preset(preset)


def bottleneck_shape(trainer: nnUNetTrainer) -> list[int]:
    """The input of the U-Net's bottleneck in a training step, from the plans: (B, C, *spatial), C the last stage's
    features, spatial the patch divided by the product of the strides."""
    import numpy as np

    manager = trainer.configuration_manager
    kwargs = manager.network_arch_init_kwargs
    strides = np.prod(np.asarray(kwargs["strides"]), axis=0)
    spatial = [int(p // s) for p, s in zip(manager.patch_size, strides, strict=True)]
    return [int(trainer.batch_size), int(kwargs["features_per_stage"][-1]), *spatial]


def parameter_counts(network: torch.nn.Module) -> dict[str, int | str | None]:
    """Trainable and frozen parameters and bytes, and the parameters of the LLM block and of its layer."""
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


def plan_info(trainer: nnUNetTrainer, configuration: str) -> dict:
    """The plan the trainers share: dataset, configuration, network, patch and batch size."""
    manager = trainer.configuration_manager
    return {"patch_size": [int(s) for s in manager.patch_size], "batch_size": trainer.batch_size,
            "network": manager.network_arch_class_name.split(".")[-1],
            "features_per_stage": manager.network_arch_init_kwargs.get("features_per_stage"),
            "dataset": trainer.plans_manager.dataset_name, "configuration": configuration,
            "bottleneck_shape": bottleneck_shape(trainer)}


def llm_info(trainer: nnUNetTrainer) -> dict | None:
    """The LLM block's settings from the trainer's plans (``nnunetv2_llm`` key); None for a trainer without one."""
    spec = trainer.plans_manager.plans.get("nnunetv2_llm")
    if not spec:
        return None
    info = {k: spec[k] for k in ("mixer", "source", "source_format", "layer", "model_type", "dtype", "rank")}
    info["width"] = spec["llm_config"]["hidden_size"]
    info["intermediate"] = spec["llm_config"].get("intermediate_size")
    return info


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
        shape = [int(np.round(p * s)) for p, s in zip(patch, scale, strict=True)]
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
