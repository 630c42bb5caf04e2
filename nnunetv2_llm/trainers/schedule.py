"""nnU-Net's poly learning-rate schedule for optimizers with several parameter groups."""

from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's ``PolyLRScheduler`` (``initial_lr * (1 - step / max_steps) ** 0.9``), each parameter group scaled by
    its ``lr_scale`` (default 1): nnU-Net's own sets every group to the same rate. With one group of scale 1 the
    rates equal nnU-Net's."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
