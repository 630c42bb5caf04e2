"""Helpers for the reliability tests: run nnU-Net's real commands, optionally killing them at a chosen moment."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_llm.common.nnunet_commands import nnunet_command

DATASET = "4"
CONFIGURATION = "3d_fullres"


def train_env(nnunet_workdir: dict[str, str], results: Path, source: Path | str | None, layer: str | None = "1",
              **extra: str) -> dict[str, str]:
    """The session work dir's env with a private results folder, augmentation in the main process (no worker
    processes to orphan, deterministic), one export process, and the LLM source/layer set."""
    env = {**os.environ, **nnunet_workdir, "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0",
           "nnUNet_def_n_proc": "1", "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER", "nnUNet_LLM_SEED", "nnUNet_LLM_ALLOW_PICKLE",
                 "nnUNet_LLM_MAX_NONFINITE", "nnUNet_LLM_SAVE_EVERY"):
        env.pop(name, None)
    if source is not None:
        env["nnUNet_LLM_SOURCE"] = str(source)
    if layer is not None:
        env["nnUNet_LLM_LAYER"] = layer
    Path(results).mkdir(parents=True, exist_ok=True)
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    output: str
    killed: bool
    pgid: int = 0

    def group_alive(self) -> bool:
        """Whether any process of the command's process group (e.g. augmentation workers) is still running."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def run_command(args: list[str], env: dict[str, str], kill_when: str | None = None, sig: int = signal.SIGTERM,
                whole_group: bool = False, delay: float = 0.0, timeout: float = 400) -> Run:
    """Run an nnU-Net console script; when a line matches ``kill_when``, wait ``delay`` s and send ``sig`` to the
    process (or its whole process group). stdout and stderr are merged."""
    proc = subprocess.Popen([nnunet_command(args[0]), *args[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out, killed, deadline = [], False, time.monotonic() + timeout
    pattern = re.compile(kill_when) if kill_when else None
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{args[0]} ran past {timeout} s; output so far:\n{''.join(out)[-3000:]}") from None
            if line is None:
                break
            out.append(line)
            if pattern is not None and not killed and pattern.search(line):
                time.sleep(delay)
                (os.killpg(proc.pid, sig) if whole_group else os.kill(proc.pid, sig))
                killed = True
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Run(proc.returncode, "".join(out), killed, proc.pid)


def train(trainer: str, env: dict[str, str], *extra: str, **kwargs) -> Run:
    return run_command(["nnUNetv2_train", DATASET, CONFIGURATION, "0", "-tr", trainer, "-device", "cpu", *extra],
                       env, **kwargs)


def fold_dir(env: dict[str, str], trainer: str, fold: str = "0") -> Path:
    return Path(env["nnUNet_results"]) / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / \
        f"fold_{fold}"


def loaded_fingerprints(output: str) -> dict[str, str]:
    """The checksums the trainer logs after loading a checkpoint (``nnunetv2_llm: loaded ...: k=v ...``)."""
    from nnunetv2_llm.trainers.reliability.fingerprints import parse_fingerprints

    match = re.search(r"nnunetv2_llm: loaded (\S+) \(epoch counter (\d+)\): (.*)", output)
    assert match, f"no 'loaded' line in the output:\n{output[-3000:]}"
    return {"file": match.group(1), "epoch": match.group(2), **parse_fingerprints(match.group(3))}


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text




def make_trainer(name: str, workdir: dict[str, str], results: Path, monkeypatch, source: Path | str | None,
                 layer: str | None = "1", **env: str):
    """An nnU-Net trainer built in this process (as nnUNetv2_train does), on the CPU, writing to ``results``."""
    import json

    import torch

    import nnunetv2_llm.trainers as trainers

    # nnU-Net 2.8 reads its folders from the environment when it needs them
    monkeypatch.setenv("nnUNet_raw", workdir["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", workdir["nnUNet_preprocessed"])
    monkeypatch.setenv("nnUNet_results", str(results))
    for key in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER", "nnUNet_LLM_SEED", "nnUNet_LLM_MAX_NONFINITE"):
        monkeypatch.delenv(key, raising=False)
    if source is not None:
        monkeypatch.setenv("nnUNet_LLM_SOURCE", str(source))
    if layer is not None:
        monkeypatch.setenv("nnUNet_LLM_LAYER", layer)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pre = Path(workdir["nnUNet_preprocessed"]) / "Dataset004_Hippocampus"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnUNetv2_train's get_trainer_from_args adds this
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return getattr(trainers, name)(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))


def random_batch(trainer, seed: int = 0) -> dict:
    """A batch of the trainer's patch size with deep-supervision targets of the network's output shapes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 1, *patch, generator=generator)
    with torch.no_grad():
        outputs = trainer.network(data)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    target = [torch.randint(0, 3, (2, 1, *o.shape[2:]), generator=generator).float() for o in outputs]
    return {"data": data, "target": target}
