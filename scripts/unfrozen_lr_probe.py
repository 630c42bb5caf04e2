"""Which learning rate for an LLM layer that trains with nnU-Net (``nnUNetTrainerLLMUnfrozen``)?

For each scale of nnU-Net's rate (SGD 0.01, momentum 0.99, poly decay) given to the layer's parameter group, trains
from the same seed on the same real batches (the embedded Hippocampus subset, 3d_fullres, fold 0, CPU) for a few
steps and prints, side by side: the mean training loss of the last half of the steps, the layer's relative drift
``||W - W0|| / ||W0||``, and whether every loss was finite. Usage::

    python scripts/unfrozen_lr_probe.py --work-dir /tmp/probe --steps 20 --scales 1 0.1 0.01
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def probe(scale: float, env: dict[str, str], steps: int) -> dict:
    """Train ``steps`` steps with the layer's group at ``scale`` x nnU-Net's rate; loss and layer drift."""
    from nnunetv2_llm.common.nnunet_commands import dataset_folder
    from nnunetv2_llm.model.network import unwrap_network
    from nnunetv2_llm.model.spec import FROZEN_PREFIX
    from nnunetv2_llm.trainers.variants.unfrozen import nnUNetTrainerLLMUnfrozen

    preprocessed = dataset_folder(env["nnUNet_preprocessed"], 4)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 pops this from the plans it is given
    cls = type("Probe", (nnUNetTrainerLLMUnfrozen,), {"llm_layer_lr_scale": scale, "llm_seed": 0})
    trainer = cls(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 1000  # the poly decay stays near its start over the probe's steps
    trainer.on_train_start()
    layer = {k: p for k, p in unwrap_network(trainer.network).named_parameters() if k.startswith(FROZEN_PREFIX)}
    start = {k: p.detach().clone() for k, p in layer.items()}
    losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(steps)]
    drift = (sum(float((p - start[k]).norm() ** 2) for k, p in layer.items())
             / sum(float(w.norm() ** 2) for w in start.values())) ** 0.5
    trainer.on_train_end()
    half = losses[len(losses) // 2:]
    return {"scale": scale, "layer_lr": 0.01 * scale, "loss_last_half": sum(half) / len(half),
            "layer_drift": drift, "finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def main() -> None:
    from nnunetv2_llm.common.nnunet_commands import FIXTURE, demo_env, ensure_preprocessed, ensure_raw_from_msd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("unfrozen_lr_probe"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    args = parser.parse_args()
    env = demo_env(args.work_dir)
    ensure_raw_from_msd(FIXTURE, 4, env)
    ensure_preprocessed(4, "3d_fullres", env)
    env["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: the same batches for every scale
    os.environ.update(env)
    rows = [probe(scale, env, args.steps) for scale in args.scales]
    print(f"{'scale':>7} {'layer lr':>9} {'loss (last half)':>17} {'layer drift':>12} finite")
    for r in rows:
        print(f"{r['scale']:>7g} {r['layer_lr']:>9.0e} {r['loss_last_half']:>17.4f} {r['layer_drift']:>12.2e} "
              f"{r['finite']}")


if __name__ == "__main__":
    main()
