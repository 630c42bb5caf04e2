"""User-facing errors: one clear message that names the setting to fix."""

import sys
from contextlib import contextmanager
from typing import Iterator


class LLMSettingError(Exception):
    """A bad LLM choice or input, explained in one message naming the setting to fix."""

    def __init__(self, message: str, setting: str | None = None):
        self.setting = setting
        super().__init__(f"{message} (fix: {setting})" if setting else message)


@contextmanager
def exit_on_setting_error(prefix: str = "nnunetv2_llm") -> Iterator[None]:
    """Turn an LLMSettingError into a one-line message and exit code 2 instead of a traceback.

    Used where nnU-Net's own entry points (nnUNetv2_train, nnUNetv2_predict) call our code.
    """
    try:
        yield
    except LLMSettingError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
