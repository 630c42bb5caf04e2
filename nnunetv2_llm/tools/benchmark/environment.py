"""What a benchmark ran on: date, versions, device, threads, CPU or GPU model, and the checkout's git commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return platform.processor()


def _git_commit() -> str | None:
    """The short commit of the checkout this package runs from; None outside a git checkout."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: torch.device) -> dict[str, str | int | None]:
    """Date, Python and package versions, device and thread settings, CPU/GPU model and the git commit."""
    import datetime
    import platform

    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "nnunetv2": _version("nnunetv2"), "transformers": _version("transformers"),
        "dynamic_network_architectures": _version("dynamic_network_architectures"),
        "nnunetv2_llm": _version("nnunetv2-llm"), "device": device.type,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": _cpu_model(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_total"] = torch.cuda.get_device_properties(device).total_memory
    info["git_commit"] = _git_commit()
    return info
