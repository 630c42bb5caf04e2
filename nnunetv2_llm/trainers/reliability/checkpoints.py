"""The trainer's checkpoints: atomic writes every epoch, checked loads, fallback past unreadable files.

- ``checkpoint_latest.pth`` is written after every epoch (nnU-Net: every 50), so ``--c`` continues from the last
  completed epoch; ``nnUNet_LLM_SAVE_EVERY=N`` changes that.
- Loading (``--c``, ``--val``): an unreadable checkpoint is renamed ``*.corrupt`` (kept, not deleted):
  ``checkpoint_latest.pth`` then falls back to ``checkpoint_best.pth``, while an unreadable
  ``checkpoint_final.pth`` stops with a message (``--val`` must never validate an unfinished state; re-running
  with ``--c`` continues from the latest checkpoint, or from the best one once a finished run removed the latest).
  Before nnU-Net loads it, the checkpoint is checked against the network built from the current settings (shapes,
  and the frozen LLM layer's checksum), and a line with checksums of the loaded state goes to the training log.
- A fresh start (epoch 0) in a fold folder with an earlier ``checkpoint_final.pth`` renames that file
  (``*.previous-<time>``), so an interrupted new run's ``--c`` cannot pick the old one up.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NoReturn

from nnunetv2_llm.common.atomic_files import remove_stale_temporaries
from nnunetv2_llm.llm.source import ENV_ALLOW_PICKLE
from nnunetv2_llm.model.network import unwrap_network
from nnunetv2_llm.model.spec import frozen_layer_differs
from nnunetv2_llm.trainers.reliability.checkpoint_io import (
    CHECKPOINT_ORDER,
    CheckpointUnreadable,
    atomic_json_in_nnunet_trainer,
    atomic_torch_save,
    load_checkpoint_file,
)
from nnunetv2_llm.trainers.reliability.exits import ExitMixin, raise_setting_error
from nnunetv2_llm.trainers.reliability.fingerprints import format_fingerprints, state_fingerprints

ENV_SAVE_EVERY = "nnUNet_LLM_SAVE_EVERY"
LLM_SETTINGS = "nnUNet_LLM_SOURCE / nnUNet_LLM_LAYER"


class CheckpointMixin(ExitMixin):
    """nnU-Net's checkpoint save and load, made atomic and checked (the frozen-layer check applies when the
    trainer has an ``llm_spec``)."""

    frozen_prefix: str | None = None  # set by LLM trainers: where the frozen layer sits in the state dict

    def on_train_start(self) -> None:
        """Stale temporaries removed, an earlier run's final checkpoint set aside, nnU-Net's json copies atomic."""
        if self.local_rank == 0:
            removed = remove_stale_temporaries(self.output_folder) + remove_stale_temporaries(self.output_folder_base)
            if removed:
                self.print_to_log_file(f"nnunetv2_llm: removed unfinished temporary files {removed} "
                                       "(left by a process killed while writing)")
            self._set_aside_earlier_final_checkpoint()
        if self.current_epoch > 0:
            self._last_saved_epoch = self.current_epoch - 1
        with atomic_json_in_nnunet_trainer():
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
        self.print_to_log_file(f"nnunetv2_llm: this fold starts afresh; the earlier run's {CHECKPOINT_ORDER[0]} is "
                               f"kept as {os.path.basename(kept)}", also_print_to_console=True)

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
        """nnU-Net's load_checkpoint, after a safe read (with fallback) and a check that the checkpoint fits."""
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
        names = list(CHECKPOINT_ORDER[CHECKPOINT_ORDER.index(base):]) if base in CHECKPOINT_ORDER[1:] else [base]
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
                problems.append(self._set_aside_unreadable(path, e.reason))
        self._no_readable_checkpoint(filename, problems)

    def _set_aside_unreadable(self, path: str, reason: str) -> str:
        """Rename an unreadable checkpoint to ``*.corrupt`` (rank 0), log it; what the final message says of it."""
        kept, name = f"{path}.corrupt", os.path.basename(path)
        if self.local_rank == 0:
            with contextlib.suppress(OSError):
                os.replace(path, kept)
        self.print_to_log_file(f"nnunetv2_llm: WARNING: {name} is unreadable ({reason}); kept as "
                               f"{os.path.basename(kept)}, trying the next checkpoint")
        return f"{name} ({reason}; kept as {os.path.basename(kept)})"

    @staticmethod
    def _no_readable_checkpoint(filename: str, problems: list[str]) -> NoReturn:
        """Stop (exit 2) with the advice that fits the checkpoint asked for, when none in its order was readable."""
        folder, base = os.path.dirname(filename), os.path.basename(filename)
        if base == CHECKPOINT_ORDER[0]:
            raise_setting_error(f"{filename} is unreadable: {'; '.join(problems)}. Run the nnUNetv2_train command "
                                "again with --c (instead of --val, if you used it): it continues from "
                                "checkpoint_latest.pth, or from checkpoint_best.pth when the finished run removed the "
                                "latest one, and trains the remaining epochs again", "--c")
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
        mismatched = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)} now"
                      for k in sorted(own.keys() & saved.keys()) if tuple(saved[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or mismatched:
            details = "; ".join(filter(None, [
                f"shapes differ: {', '.join(mismatched[:3])}" if mismatched else "",
                f"missing: {', '.join(missing[:3])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:3])}" if unexpected else ""]))
            raise_setting_error(f"{used} does not fit the network built from the current settings ({details}); "
                                "it was trained with another LLM, layer or trainer. Use the same settings, or a new "
                                "results folder", LLM_SETTINGS)
        spec = getattr(self, "llm_spec", None)
        if spec is None or self.frozen_prefix is None:
            return
        expected = self._built_layer_sha256  # the LLM trainer's initialize, run before any load
        found = frozen_layer_differs(saved, spec, expected=expected, prefix=self.frozen_prefix)
        if found is not None:
            raise_setting_error(
                f"the frozen LLM layer in {used} differs from layer {spec.layer} of {spec.source} "
                f"(sha256 {found[:12]} in the checkpoint, {expected[:12]} configured): the model folder was "
                "trained with another LLM source or layer, or the source file changed since", LLM_SETTINGS)
