"""User-facing errors: one clear message that names the setting to fix."""

import contextvars
import sys
from contextlib import contextmanager
from typing import Iterator

# Which name the user knows a setting by: library code raises with the environment variable's name
# (``nnUNet_LLM_SOURCE``), and a command that took the value from a flag maps it to that flag (``--llm-source``).
# No default on the variable itself: a shared mutable default could be changed in place; ``get({})`` instead.
_SETTING_NAMES: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("nnunetv2_llm_setting_names")


class LLMSettingError(Exception):
    """A bad LLM choice or input, explained in one message naming the setting to fix."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        setting = _SETTING_NAMES.get({}).get(setting, setting) if setting else setting
        self.setting = setting
        self.detail = message
        super().__init__(f"{message} (fix: {setting})" if setting else message)


@contextmanager
def setting_names(**aliases: str) -> Iterator[None]:
    """Within this block, errors about ``setting`` name ``aliases[setting]`` instead, e.g.
    ``setting_names(nnUNet_LLM_SOURCE="--llm-source")`` when the value came from that flag."""
    token = _SETTING_NAMES.set({**_SETTING_NAMES.get({}), **aliases})
    try:
        yield
    finally:
        _SETTING_NAMES.reset(token)


@contextmanager
def exit_on_setting_error(prefix: str = "nnunetv2_llm") -> Iterator[None]:
    """Turn an LLMSettingError into a one-line message and exit code 2 instead of a traceback.

    Used where nnU-Net's own entry points (nnUNetv2_train, nnUNetv2_predict) call our code.
    """
    try:
        yield
    except LLMSettingError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
