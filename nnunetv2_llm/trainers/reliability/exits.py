"""How the reliability code stops a training run: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import NoReturn

from nnunetv2_llm.common.errors import LLMSettingError, exit_on_setting_error


def raise_setting_error(message: str, setting: str) -> NoReturn:
    """Raise an LLMSettingError from trainer code that nnU-Net calls: printed as one line, exit code 2."""
    with exit_on_setting_error():
        raise LLMSettingError(message, setting)


class ExitMixin:
    """The exit and the resume advice the other reliability mixins share."""

    _last_saved_epoch: int | None = None  # the epoch whose state checkpoint_latest.pth holds

    def _exit_with(self, message: str, code: int) -> NoReturn:
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
