"""Which layers of the model to use: one index (``-1``) or a Python-style half-open range (``20:24``, ``-4:``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_LAYER

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _index(text: str, value: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LLMSettingError(f"layer '{value}' is neither an integer index nor a range START:END of integers",
                              ENV_LAYER) from None


def parse_layers(value: int | str, n: int) -> range:
    """The layers ``value`` selects in a model of ``n`` layers.

    Args:
        value: an index (negative counts from the end), or ``START:END`` as a Python slice without a step (half-open;
            negative bounds count from the end; an empty bound means the first or past the last layer).
        n: the model's number of layers.

    Returns:
        The selected layer indices, consecutive and non-empty, each in ``0..n-1``.

    Raises:
        LLMSettingError: not an integer or a range, an index or bound outside the model, or an empty range.
    """
    text = str(value).strip()
    if ":" not in text:
        index = _index(text, text)
        if not -n <= index < n:
            raise LLMSettingError(f"layer index {index} is out of range: the model has {n} layers (0..{n - 1})",
                                  ENV_LAYER)
        return range(index % n, index % n + 1)
    start_text, _, end_text = text.partition(":")
    start = _index(start_text, text) if start_text.strip() else 0
    end = _index(end_text, text) if end_text.strip() else n
    for bound in (start, end):
        if not -n <= bound <= n:
            raise LLMSettingError(f"layer range {text}: bound {bound} is outside the model's {n} layers "
                                  f"(bounds -{n}..{n})", ENV_LAYER)
    layers = range(n)[start:end]
    if len(layers) == 0:
        raise LLMSettingError(f"layer range {text} selects no layer (layers {layers.start}..{layers.stop - 1}): "
                              "give START:END with START before END, e.g. 20:24", ENV_LAYER)
    return layers


def resolve_layers(config: PretrainedConfig, layer: int | str | None) -> range:
    """The layers to use: ``layer``, else ``$nnUNet_LLM_LAYER``, else the last layer (as MedVisionLlama)."""
    value = layer if layer not in (None, "") else os.environ.get(ENV_LAYER) or -1
    return parse_layers(value, config.num_hidden_layers)
