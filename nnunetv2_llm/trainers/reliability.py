"""Reliability for long nnU-Net runs: atomic checkpoints, exact resume, no silent NaN, graceful SIGTERM, seeding.

``ReliabilityMixin`` goes in front of ``nnUNetTrainer`` (or any subclass) in a trainer's bases. What it changes:

- Checkpoints: nnU-Net's ``save_checkpoint`` calls ``torch.save`` straight onto the final name, so a kill while
  writing leaves a truncated ``checkpoint_latest.pth`` that ``--c`` then fails on. Here every checkpoint is written
  to a temporary file in the same folder, flushed and fsynced, then moved over the old one with ``os.replace``
  (atomic on POSIX and Windows): the folder holds either the old or the new checkpoint, never half of one. The
  plans.json/dataset.json copies nnU-Net writes at the start of training are written the same way.
- ``checkpoint_latest.pth`` is written after every epoch (nnU-Net: every 50), so ``--c`` continues from the last
  completed epoch; ``nnUNet_LLM_SAVE_EVERY=N`` changes that.
- Loading (``--c``, ``--val``): checkpoints are read with ``torch.load(weights_only=True)`` (numpy scalars
  allowed), so a tampered checkpoint cannot run code; an unreadable one is renamed ``*.corrupt`` (kept, not
  deleted): ``checkpoint_latest.pth`` then falls back to ``checkpoint_best.pth``, while an unreadable
  ``checkpoint_final.pth`` stops with a message (``--val`` must never validate an unfinished state; re-running
  with ``--c`` continues from the latest checkpoint, or from the best one once a finished run removed the latest). Before nnU-Net loads it, the checkpoint is checked
  against the network built from the current settings (shapes, and the frozen LLM layer's checksum), and a
  line with checksums of the loaded state goes to the training log.
- A non-finite loss (or, without a GradScaler, a non-finite gradient norm) skips that optimizer step, so the
  weights and the next checkpoint stay finite, and logs the epoch, iteration and likely cause; after
  ``nnUNet_LLM_MAX_NONFINITE`` (default 3) such steps in a row training stops with exit code 3 and a message
  naming the last good checkpoint. With a GradScaler (CUDA fp16), overflowing gradients are the scaler's
  business (it skips the step and lowers the scale), as in nnU-Net.
- SIGTERM (cluster time limits, ``kill``) ends training with a one-line message saying which epoch
  ``--c`` continues from, instead of dying mid-write; SIGKILL cannot be caught, and atomic writes cover it.
- ``nnUNet_LLM_SEED=S`` seeds Python, NumPy and torch before the network is built and before the data loaders
  start (on resume with ``S + epoch``): with ``nnUNet_n_proc_DA=0`` (augmentation in the main process) two CPU runs
  on the same machine give the same losses. On CUDA nnU-Net turns on ``cudnn.benchmark`` (non-deterministic
  algorithms) and torch.compile, so GPU runs are seeded but not bit-reproducible. Unset, nnU-Net's default
  (unseeded) behaviour is kept.
- A fresh start (epoch 0) in a fold folder with an earlier ``checkpoint_final.pth`` renames that file
  (``*.previous-<time>``), so an interrupted new run's ``--c`` cannot pick the old one up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2_llm.common.atomic_files import atomic_file, remove_stale_temporaries
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_ALLOW_PICKLE, pickle_allowed
from nnunetv2_llm.model.network import unwrap_network

ENV_SEED = "nnUNet_LLM_SEED"
ENV_SAVE_EVERY = "nnUNet_LLM_SAVE_EVERY"
ENV_MAX_NONFINITE = "nnUNet_LLM_MAX_NONFINITE"
CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order
EXIT_NONFINITE = 3


# ----------------------------------------------------------------------------------------------- atomic files
def atomic_torch_save(obj: Any, filename: str | os.PathLike) -> None:
    with atomic_file(filename, "wb") as f:
        torch.save(obj, f)


def atomic_save_json(obj: Any, filename: str | os.PathLike, indent: int = 4, sort_keys: bool = True) -> None:
    """Same output as batchgenerators' ``save_json`` (which nnU-Net uses), written atomically."""
    with atomic_file(filename, "w") as f:
        json.dump(obj, f, sort_keys=sort_keys, indent=indent)


# ------------------------------------------------------------------------------------------ safe checkpoints
class CheckpointUnreadable(Exception):
    """The file is truncated or corrupt (``security`` False) or needs unpickling of arbitrary objects (True)."""

    def __init__(self, path: str, reason: str, security: bool = False):
        self.path, self.reason, self.security = path, reason, security
        super().__init__(f"{path}: {reason}")


def _numpy_safe_globals() -> list:
    """What an nnU-Net checkpoint needs besides tensors and builtins: numpy scalars (the logger's values)."""
    import numpy.dtypes as npd

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore
    dtype_classes = [getattr(npd, name) for name in dir(npd) if name.endswith("DType")]
    return [scalar, np.dtype, *dtype_classes]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` (tensors, numbers, strings, containers, numpy scalars: nothing that
    can run code). ``nnUNet_LLM_ALLOW_PICKLE=1`` allows full unpickling for a checkpoint the user trusts."""
    path = os.fspath(path)
    allow_pickle = pickle_allowed()
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "unsupported global" in str(e).lower():
            if not allow_pickle:
                first = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
                raise CheckpointUnreadable(
                    path, f"it holds pickled objects other than tensors and numbers ({first[:120]}); loading it could "
                    f"run code, so it is refused. If you trust this file, set {ENV_ALLOW_PICKLE}=1", security=True
                ) from None
            try:
                checkpoint = torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:
                raise CheckpointUnreadable(path, f"{type(e2).__name__}: {e2}") from None
        else:
            raise CheckpointUnreadable(path, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # truncated zip, empty file, disk error
        raise CheckpointUnreadable(path, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointUnreadable(path, "not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


# --------------------------------------------------------------------------------------------- fingerprints
def _hash_into(digest, obj: Any) -> None:
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
    digest = hashlib.sha256()
    _hash_into(digest, obj)
    return digest.hexdigest()


def state_fingerprints(network_weights: dict, optimizer_state: dict | None, grad_scaler_state: dict | None,
                       dtype: str | None, frozen_prefix: str | None) -> dict[str, str]:
    """Checksums of what a resume must restore exactly: the frozen LLM layer (comparable with the spec's
    ``layer_sha256``), every other network tensor (U-Net, projections, LoRA adapters), the optimizer state
    (momentum buffers and hyper-parameters) and the GradScaler state."""
    from nnunetv2_llm.model.spec import frozen_layer_sha256

    weights = {(k[7:] if k.startswith("module.") else k): v for k, v in network_weights.items()}
    is_frozen = (lambda k: frozen_prefix is not None and k.startswith(frozen_prefix) and "lora_" not in k)
    out = {}
    if frozen_prefix is not None and dtype and any(is_frozen(k) for k in weights):
        out["frozen_layer"] = frozen_layer_sha256(weights, dtype, frozen_prefix)
    out["trainable"] = tree_sha256({k: v for k, v in weights.items() if not is_frozen(k)})
    out["optimizer"] = tree_sha256(optimizer_state) if optimizer_state is not None else "none"
    out["grad_scaler"] = tree_sha256(grad_scaler_state) if grad_scaler_state is not None else "none"
    return out


def format_fingerprints(fingerprints: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in fingerprints.items())


def parse_fingerprints(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


# ------------------------------------------------------------------------------------------------- helpers
def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over DDP ranks (every rank must take the same skip decision, or the gradient all-reduce
    of the ranks that did step would wait forever for the one that did not)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def env_int(name: str, default: int | None, minimum: int = 0) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise LLMSettingError(f"{name}='{value}' is not an integer", name) from None
    if number < minimum:
        raise LLMSettingError(f"{name}={number} must be at least {minimum}", name)
    return number


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _max_abs(t: torch.Tensor) -> float:
    t = t.detach().float()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else float("nan")


# --------------------------------------------------------------------------------------------------- mixin
class ReliabilityMixin:
    """Put in front of ``nnUNetTrainer`` in the bases; see the module docstring. Works for any nnU-Net trainer
    (the frozen-layer checks apply when the trainer has an ``llm_spec``)."""

    frozen_prefix: str | None = None  # set by LLM trainers: where the frozen layer sits in the state dict

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            self.save_every = env_int(ENV_SAVE_EVERY, 1, minimum=1)
            self.max_nonfinite_steps = env_int(ENV_MAX_NONFINITE, 3, minimum=1)
            self.llm_seed = env_int(ENV_SEED, None)
        except LLMSettingError as e:
            self._exit_with(f"error: {e}", 2)
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0
        self._iteration = 0
        self._last_saved_epoch: int | None = None
        self._previous_sigterm = None

    # ---- messages and exits
    def _exit_with(self, message: str, code: int):
        """One line on stderr (and in the training log when there is one), then exit: no traceback."""
        with contextlib.suppress(Exception):
            self.print_to_log_file(f"nnunetv2_llm: {message}", also_print_to_console=False)
        print(f"nnunetv2_llm: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code)

    def _resume_hint(self) -> str:
        latest = Path(self.output_folder) / "checkpoint_latest.pth"
        if self._last_saved_epoch is not None and latest.is_file():
            return (f"checkpoint_latest.pth holds the state after epoch {self._last_saved_epoch}; run the same "
                    "nnUNetv2_train command with --c to continue from epoch "
                    f"{self._last_saved_epoch + 1}")
        return "run the same nnUNetv2_train command with --c to continue from the latest checkpoint"

    # ---- seeding
    def initialize(self) -> None:
        if self.llm_seed is not None and not self.was_initialized:
            seed_everything(self.llm_seed)
        return super().initialize()

    # ---- training start/end: stale temporaries, atomic json copies, SIGTERM, data seed
    def on_train_start(self) -> None:
        if self.local_rank == 0:
            removed = remove_stale_temporaries(self.output_folder) + remove_stale_temporaries(self.output_folder_base)
            if removed:
                self.print_to_log_file(f"nnunetv2_llm: removed unfinished temporary files {removed} "
                                       "(left by a process killed while writing)")
            self._set_aside_earlier_final_checkpoint()
        if self.llm_seed is not None:
            if not self.was_initialized:
                self.initialize()
            seed_everything(self.llm_seed + self.current_epoch)
            self.print_to_log_file(f"nnunetv2_llm: seeded with {self.llm_seed} + epoch {self.current_epoch}")
        self._install_sigterm_handler()
        if self.current_epoch > 0:
            self._last_saved_epoch = self.current_epoch - 1
        with _atomic_json_in_nnunet_trainer():
            super().on_train_start()

    def _set_aside_earlier_final_checkpoint(self) -> None:
        """A training started afresh (epoch 0) in a fold folder that holds a finished run's checkpoint_final.pth: if
        it were left there, an interrupted new run's ``--c`` would load that old final (nnU-Net prefers it), skip
        training and delete the new run's checkpoint_latest.pth. It is renamed, not deleted."""
        final = os.path.join(self.output_folder, CHECKPOINT_ORDER[0])
        if self.current_epoch != 0 or not os.path.isfile(final):
            return
        kept = f"{final}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(final, kept)
        self.print_to_log_file(f"nnunetv2_llm: this fold starts afresh; the earlier run's {CHECKPOINT_ORDER[0]} is kept "
                               f"as {os.path.basename(kept)}", also_print_to_console=True)

    def on_train_end(self) -> None:
        try:
            super().on_train_end()
        finally:
            self._restore_sigterm_handler()
        if self._nonfinite_total:
            self.print_to_log_file(f"nnunetv2_llm: {self._nonfinite_total} optimizer steps were skipped in this run "
                                   "because of non-finite values (see the warnings above)")

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        trainer_pid = os.getpid()

        def on_sigterm(signum, frame):
            if os.getpid() != trainer_pid:
                # A forked data-augmentation worker (it inherited this handler). A whole process group gets
                # SIGTERM at once (scancel, kill -- -PGID): dying at once would make batchgenerators' results
                # thread in the trainer raise "background workers are no longer alive" with a traceback before
                # the trainer's own handler runs. So keep working for a grace period: the trainer stops the
                # workers cleanly; if it does not (it was not signalled), die anyway.
                signal.signal(signum, signal.SIG_DFL)
                timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGKILL))
                timer.daemon = True  # a non-daemon timer would hold up every normal exit of the worker by 5 s
                timer.start()
                return
            self._restore_sigterm_handler()
            self._stop_data_loaders()
            self._exit_with(f"interrupted by {signal.Signals(signum).name} during epoch {self.current_epoch}; "
                            f"{self._resume_hint()}", 128 + signum)

        with contextlib.suppress(ValueError, OSError):
            self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _stop_data_loaders(self) -> None:
        """Stop nnU-Net's augmentation workers before exiting, quietly (their results thread would otherwise
        report the dying workers with a traceback)."""
        previous_hook = threading.excepthook

        def quiet(args):
            if not (isinstance(args.exc_value, RuntimeError) and "workers are no longer alive" in str(args.exc_value)):
                previous_hook(args)

        threading.excepthook = quiet
        for loader in (self.dataloader_train, self.dataloader_val):
            finish = getattr(loader, "_finish", None)
            if finish is not None:
                with contextlib.suppress(Exception), open(os.devnull, "w") as devnull, \
                        contextlib.redirect_stdout(devnull):
                    finish()

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # ---- checkpoints
    def _checkpoint_dict(self) -> dict:
        mod = unwrap_network(self.network)
        return {
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema_with_last_epoch(),
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }

    def _best_ema_with_last_epoch(self) -> float | None:
        """The best EMA pseudo Dice including the last logged epoch. nnU-Net's on_epoch_end saves
        checkpoint_latest.pth before it updates ``_best_ema``; storing the value before that update made a resumed
        run take its next epoch for a new best and overwrite a better checkpoint_best.pth (this package saves the
        latest checkpoint every epoch, so nearly every resume was exposed). Same comparison as nnU-Net's."""
        emas = self.logger.get_value("ema_fg_dice", step=None)
        if emas and (self._best_ema is None or emas[-1] > self._best_ema):
            return emas[-1]
        return self._best_ema

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (same keys and values, except ``_best_ema``: see ``_best_ema_with_last_epoch``),
        written atomically."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        try:
            atomic_torch_save(self._checkpoint_dict(), filename)
        except OSError as e:
            self._exit_with(f"error: could not write {filename} ({e}); the previous checkpoint is intact. Free disk "
                            f"space or fix the folder, then {self._resume_hint()}", 1)
        if os.path.basename(filename) == "checkpoint_latest.pth":
            self._last_saved_epoch = self.current_epoch

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            checkpoint, used = self._read_checkpoint_with_fallback(os.fspath(filename_or_checkpoint))
        else:
            checkpoint, used = filename_or_checkpoint, "the given checkpoint"
        own = unwrap_network(self.network).state_dict()
        weights = {(k[7:] if k not in own and k.startswith("module.") else k): v  # nnU-Net's DDP-prefix heuristic
                   for k, v in checkpoint["network_weights"].items()}
        self._check_checkpoint_fits(weights, own, used)
        self._apply_checkpoint(checkpoint, weights)
        fingerprints = state_fingerprints(unwrap_network(self.network).state_dict(), self.optimizer.state_dict(),
                                          self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                                          getattr(getattr(self, "llm_spec", None), "dtype", None), self.frozen_prefix)
        self.print_to_log_file(f"nnunetv2_llm: loaded {os.path.basename(used)} (epoch counter "
                               f"{self.current_epoch}): {format_fingerprints(fingerprints)}")
        if self.current_epoch > 0:
            self._last_saved_epoch = self.current_epoch - 1

    def _apply_checkpoint(self, checkpoint: dict, weights: dict) -> None:
        """The body of nnU-Net 2.8.1's load_checkpoint after its ``torch.load`` (which, given a dict instead of a
        file name, fails there); ``weights`` are the checkpoint's network weights with DDP prefixes resolved."""
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        unwrap_network(self.network).load_state_dict(weights)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def _read_checkpoint_with_fallback(self, filename: str) -> tuple[dict, str]:
        """Read ``filename``; when it is truncated or corrupt, keep it as ``*.corrupt`` and try the next file in
        nnU-Net's ``--c`` order. Refuses (exit 2) a checkpoint that would need arbitrary unpickling."""
        folder, base = os.path.dirname(filename), os.path.basename(filename)
        # latest -> best only: a corrupt checkpoint_final.pth must not be replaced silently by an unfinished state
        # (``--val`` would validate it); it is set aside and the user re-runs, which then continues with --c.
        names = list(CHECKPOINT_ORDER[CHECKPOINT_ORDER.index(base):]) \
            if base in CHECKPOINT_ORDER[1:] else [base]
        problems = []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            try:
                return load_checkpoint_file(path, map_location=self.device), path
            except CheckpointUnreadable as e:
                if e.security:
                    raise_setting_error(f"refusing checkpoint {path}: {e.reason}", ENV_ALLOW_PICKLE)
                kept = f"{path}.corrupt"
                if self.local_rank == 0:
                    with contextlib.suppress(OSError):
                        os.replace(path, kept)
                problems.append(f"{name} ({e.reason}; kept as {os.path.basename(kept)})")
                self.print_to_log_file(f"nnunetv2_llm: WARNING: {name} is unreadable ({e.reason}); kept as "
                                       f"{os.path.basename(kept)}, trying the next checkpoint")
        if base == CHECKPOINT_ORDER[0]:
            raise_setting_error(f"{filename} is unreadable: {'; '.join(problems)}. Run the nnUNetv2_train command "
                                "again with --c (instead of --val, if you used it): it continues from checkpoint_latest.pth, or from "
                                "checkpoint_best.pth when the finished run removed the latest one, and trains the "
                                "remaining epochs again", "--c")
        if base == CHECKPOINT_ORDER[2] and os.path.isfile(os.path.join(folder, CHECKPOINT_ORDER[0])):
            raise_setting_error(f"{filename} is unreadable: {'; '.join(problems)}. {CHECKPOINT_ORDER[0]} is there: "
                                "validate it with --val without --val_best", "--val_best")
        raise_setting_error(f"no readable checkpoint in {folder}: {'; '.join(problems) or 'none found'}. Start "
                            "again without --c (the unreadable files are kept)", "--c")

    def _check_checkpoint_fits(self, saved: dict, own: dict, used: str) -> None:
        """The checkpoint's weights (``saved``) must fit the network built from the current settings (``own``):
        same tensor names and shapes, and the same frozen LLM layer. Otherwise nnU-Net's load_state_dict would
        fail deep inside torch, or silently train on a layer other than the configured one."""
        missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        mismatched = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)} now" for k in sorted(own.keys() & saved.keys())
                      if tuple(saved[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or mismatched:
            details = "; ".join(filter(None, [
                f"shapes differ: {', '.join(mismatched[:3])}" if mismatched else "",
                f"missing: {', '.join(missing[:3])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:3])}" if unexpected else ""]))
            raise_setting_error(f"{used} does not fit the network built from the current settings ({details}); "
                                "it was trained with another LLM, layer or trainer. Use the same settings, or a new "
                                "results folder", "nnUNet_LLM_SOURCE / nnUNet_LLM_LAYER")
        spec = getattr(self, "llm_spec", None)
        if spec is None or self.frozen_prefix is None or spec.mixer == "identity":
            return
        from nnunetv2_llm.model.spec import frozen_layer_sha256

        saved_sha = frozen_layer_sha256(saved, spec.dtype, self.frozen_prefix)
        expected = self._built_layer_sha256  # the LLM trainer's initialize, run before any load
        if saved_sha != expected:
            raise_setting_error(
                f"the frozen LLM layer in {used} differs from layer {spec.layer} of {spec.source} "
                f"(sha256 {saved_sha[:12]} in the checkpoint, {expected[:12]} configured): the model folder was "
                "trained with another LLM source or layer, or the source file changed since",
                "nnUNet_LLM_SOURCE / nnUNet_LLM_LAYER")

    # ---- NaN guard
    def on_train_epoch_start(self) -> None:
        self._iteration = 0
        return super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train_step with finite checks on the loss and gradient norm; a non-finite step is skipped."""
        from nnunetv2.utilities.helpers import dummy_context

        self._iteration += 1
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        del output
        # The finite checks read values back from the GPU only after backward, where nnU-Net syncs anyway
        # (a check between forward and backward would stall the kernel queue every step).
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)  # skips the update itself when a gradient overflowed
            self.grad_scaler.update()
            if not all_ranks_true(_finite(loss.detach()), self.device):
                return self._skip_step(f"non-finite training loss ({loss.item()}); the gradient scaler skipped "
                                       "the update", data, target)
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            finite_loss = _finite(loss.detach())
            if not all_ranks_true(finite_loss and _finite(norm), self.device):
                self.optimizer.zero_grad(set_to_none=True)
                what = (f"non-finite training loss ({loss.item()})" if not finite_loss else
                        f"non-finite gradient norm ({norm.item()}) from a finite loss ({loss.item():.4f})")
                return self._skip_step(what, data, target)
            self.optimizer.step()
        self._nonfinite_in_a_row = 0
        return {"loss": loss.detach().cpu().numpy()}

    def _skip_step(self, what: str, data: torch.Tensor, target) -> dict:
        self._nonfinite_in_a_row += 1
        self._nonfinite_total += 1
        cause = self.diagnose_nonfinite(data, target)
        where = f"at epoch {self.current_epoch}, iteration {self._iteration}"
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            self._exit_with(
                f"error: training stopped: {what} {where}, {self._nonfinite_in_a_row} steps in a row. Likely cause: "
                f"{cause}. The weights were not updated by these steps; {self._resume_hint()} after fixing the "
                f"cause (or lower initial_lr). Allowed in a row: {ENV_MAX_NONFINITE}={self.max_nonfinite_steps}",
                EXIT_NONFINITE)
        self.print_to_log_file(f"nnunetv2_llm: WARNING: {what} {where}: optimizer step skipped (weights unchanged, "
                               f"{self._nonfinite_in_a_row} in a row). Likely cause: {cause}")
        return {"loss": np.array(np.nan, dtype=np.float32)}

    def diagnose_nonfinite(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> str:
        """The most likely reason for a non-finite loss, found by looking at the batch, the weights and an
        float32 forward pass through the U-Net encoder and the LLM block. data (B, C, *patch); target (B, 1, *patch),
        or one per deep-supervision scale."""
        if not _finite(data):
            return ("the input batch holds NaN/Inf values: a preprocessed case (or its raw image) is corrupt; "
                    "re-run nnUNetv2_plan_and_preprocess and check the images")
        targets = target if isinstance(target, list) else [target]
        if not all(_finite(t.float()) for t in targets):
            return "the target holds NaN/Inf values: a preprocessed segmentation is corrupt"
        network = unwrap_network(self.network)
        bad = [name for name, p in network.named_parameters() if not _finite(p.detach())]
        if bad:
            part = "the LLM block" if bad[0].startswith("bottleneck.") else "the U-Net"
            return (f"{len(bad)} weight tensors are already NaN/Inf, first {bad[0]} in {part}: the training "
                    "diverged (learning rate too high?)")
        seen: dict[str, float] = {}
        hooks = []
        block = getattr(network, "bottleneck", None)
        if block is not None:
            hooks.append(block.register_forward_hook(
                lambda m, args, out: seen.update(features=_max_abs(args[0]), features_finite=_finite(args[0]),
                                                 block_finite=_finite(out), block=_max_abs(out))))
        try:
            with torch.no_grad(), torch.autocast(device_type=data.device.type, enabled=False):
                out = network(data.float())
            out = out[0] if isinstance(out, (list, tuple)) else out
        except Exception as e:  # the diagnosis must never be what crashes the run
            return f"a float32 forward pass for the diagnosis failed too ({type(e).__name__}: {e})"
        finally:
            for hook in hooks:
                hook.remove()
        if block is not None and not seen.get("features_finite", True):
            return "the U-Net encoder produced NaN/Inf features: the training diverged (learning rate too high?)"
        if block is not None and not seen.get("block_finite", True):
            return (f"the LLM block turned finite bottleneck features (max |x| {seen['features']:.3g}) into NaN/Inf: "
                    "overflow in the frozen layer or its projections")
        if not _finite(out):
            return "the decoder produced NaN/Inf logits from finite features: the training diverged"
        if self.device.type == "cuda":
            return (f"the float32 forward pass is finite (bottleneck features max |x| {seen.get('features', 0):.3g}): "
                    "an fp16 overflow under autocast")
        return ("the network output is finite, the loss is not: check the labels (values outside the dataset's "
                "label set?) and the loss settings")

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        """Skipped steps (NaN entries) are left out of the epoch's mean loss, and counted in the log."""
        finite = [o for o in train_outputs if np.isfinite(o["loss"]).all()]
        skipped = len(train_outputs) - len(finite)
        if skipped:
            self.print_to_log_file(f"nnunetv2_llm: {skipped} of {len(train_outputs)} steps of epoch "
                                   f"{self.current_epoch} were skipped (non-finite values)")
        return super().on_train_epoch_end(finite if finite else train_outputs)

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        losses = [float(np.mean(o["loss"])) for o in val_outputs]
        if losses and not np.isfinite(losses).all():
            self.print_to_log_file(f"nnunetv2_llm: WARNING: non-finite validation loss at epoch {self.current_epoch} "
                                   f"({sum(not np.isfinite(x) for x in losses)} of {len(losses)} batches); the "
                                   "weights are finite, so look at the validation cases' data")
        return super().on_validation_epoch_end(val_outputs)


def raise_setting_error(message: str, setting: str) -> NoReturn:
    """Raise an LLMSettingError from trainer code that nnU-Net calls: printed as one line, exit code 2."""
    from nnunetv2_llm.common.errors import exit_on_setting_error

    with exit_on_setting_error():
        raise LLMSettingError(message, setting)


@contextlib.contextmanager
def _atomic_json_in_nnunet_trainer():
    """nnU-Net's on_train_start writes plans.json and dataset.json with a plain ``save_json``: make those two
    writes atomic too (a truncated plans.json would break prediction and the next ``--c``)."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = getattr(module, "save_json", None)
    if original is None:
        yield
        return
    module.save_json = atomic_save_json
    try:
        yield
    finally:
        module.save_json = original


__all__ = ["ReliabilityMixin", "atomic_torch_save", "atomic_save_json", "load_checkpoint_file",
           "state_fingerprints", "tree_sha256", "all_ranks_true", "seed_everything", "CheckpointUnreadable"]
