"""Checksums of a training state, logged after every checkpoint load so that an exact resume can be verified."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from nnunetv2_llm.model.spec import frozen_layer_sha256


def _hash_into(digest: Any, obj: Any) -> None:
    """Deterministic hash of nested dicts/lists/tensors/numbers (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        digest.update(b"{")
        for key in sorted(obj, key=str):
            digest.update(str(key).encode() + b":")
            _hash_into(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _hash_into(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(obj.item() if isinstance(obj, np.generic) else obj).encode())


def tree_sha256(obj: Any) -> str:
    """sha256 of nested dicts, lists, tensors, arrays and numbers: equal for equal values, whatever the device."""
    digest = hashlib.sha256()
    _hash_into(digest, obj)
    return digest.hexdigest()


def state_fingerprints(network_weights: dict, optimizer_state: dict | None, grad_scaler_state: dict | None,
                       dtype: str | None, frozen_prefix: str | None) -> dict[str, str]:
    """Checksums of what a resume must restore exactly: the frozen LLM layer (comparable with the spec's
    ``layer_sha256``), every other network tensor (U-Net, projections, LoRA adapters), the optimizer state
    (momentum buffers and hyper-parameters) and the GradScaler state."""
    weights = {(k[7:] if k.startswith("module.") else k): v for k, v in network_weights.items()}

    def is_frozen(key: str) -> bool:
        return frozen_prefix is not None and key.startswith(frozen_prefix) and "lora_" not in key

    out = {}
    if frozen_prefix is not None and dtype and any(is_frozen(k) for k in weights):
        out["frozen_layer"] = frozen_layer_sha256(weights, dtype, frozen_prefix)
    out["trainable"] = tree_sha256({k: v for k, v in weights.items() if not is_frozen(k)})
    out["optimizer"] = tree_sha256(optimizer_state) if optimizer_state is not None else "none"
    out["grad_scaler"] = tree_sha256(grad_scaler_state) if grad_scaler_state is not None else "none"
    return out


def format_fingerprints(fingerprints: dict[str, str]) -> str:
    """``name=sha256 ...`` on one line, as the training log shows them."""
    return " ".join(f"{k}={v}" for k, v in fingerprints.items())


def parse_fingerprints(line: str) -> dict[str, str]:
    """The inverse of ``format_fingerprints``."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)
