"""No silent NaN: a non-finite loss (or, without a GradScaler, a non-finite gradient norm) skips that optimizer
step, so the weights and the next checkpoint stay finite, and logs the epoch, iteration and likely cause.

After ``nnUNet_LLM_MAX_NONFINITE`` (default 3) such steps in a row training stops with exit code 3 and a message
naming the last good checkpoint. With a GradScaler (CUDA fp16), overflowing gradients are the scaler's business (it
skips the step and lowers the scale), as in nnU-Net.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2_llm.model.network import unwrap_network
from nnunetv2_llm.trainers.reliability.exits import ExitMixin

ENV_MAX_NONFINITE = "nnUNet_LLM_MAX_NONFINITE"
EXIT_NONFINITE = 3


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over DDP ranks (every rank must take the same skip decision, or the gradient all-reduce
    of the ranks that did step would wait forever for the one that did not)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _max_abs(t: torch.Tensor) -> float:
    t = t.detach().float()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else float("nan")


class NanGuardMixin(ExitMixin):
    """nnU-Net's train_step with finite checks; skipped steps are counted, diagnosed and left out of the epoch's
    mean loss. ``max_nonfinite_steps``: how many skipped steps in a row stop the run."""

    max_nonfinite_steps = 3
    _nonfinite_in_a_row = 0
    _nonfinite_total = 0
    _iteration = 0

    def on_train_epoch_start(self) -> None:
        self._iteration = 0
        return super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train_step with finite checks on the loss and gradient norm; a non-finite step is skipped.
        batch: data (B, C, *patch), target (B, 1, *patch) or one per deep-supervision scale."""
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

    def _skip_step(self, what: str, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> dict:
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
        """The most likely reason for a non-finite loss, found by looking at the batch, the weights and a
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
        return self._diagnose_forward(network, data)

    def _diagnose_forward(self, network: torch.nn.Module, data: torch.Tensor) -> str:
        """Where a float32 forward pass of ``data`` (B, C, *patch) through finite weights turns non-finite."""
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

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._nonfinite_total:
            self.print_to_log_file(f"nnunetv2_llm: {self._nonfinite_total} optimizer steps were skipped in this run "
                                   "because of non-finite values (see the warnings above)")
