"""The model's config, read from local files without running remote code, and the layer index to use.

A folder's ``config.json`` is parsed here and handed to the config class of its (whitelisted) ``model_type``; an
``auto_map`` entry pointing to custom code in the folder is dropped, never imported. A GGUF file's config comes
from transformers' GGUF loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.readers.gguf import gguf_architecture, gguf_speedups
from nnunetv2_llm.llm.source import ENV_LAYER, ENV_SOURCE, one_line, source_format

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Families whose single layer runs stand-alone here (tested on tiny random configs).
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ENCODER_MODEL_TYPES = ("bert",)
SUPPORTED_MODEL_TYPES = DECODER_MODEL_TYPES + ENCODER_MODEL_TYPES


def load_config(source: Path) -> PretrainedConfig:
    """Read the model's ``PretrainedConfig`` from local files only, without running remote code."""
    fmt = source_format(source)
    try:
        config = _gguf_config(source) if fmt == "gguf" else _folder_config(source)
    except LLMSettingError:
        raise
    except Exception as e:  # transformers/gguf raise many types for unreadable or unsupported files
        raise LLMSettingError(f"could not read a model config from '{source}': {one_line(e)}", ENV_SOURCE) from None
    _check_model_type(config.model_type, source)
    for attribute in ("auto_map", "trust_remote_code"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


def _gguf_config(source: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    architecture = gguf_architecture(source)
    unsupported = LLMSettingError(f"GGUF architecture '{architecture}' of '{source}' is not supported; "
                                  f"supported: {', '.join(DECODER_MODEL_TYPES)}", ENV_SOURCE)
    try:
        with gguf_speedups():
            config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except Exception as e:
        if "not supported" in str(e).lower():
            raise unsupported from None
        raise
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported
    return config


def _folder_config(source: Path) -> PretrainedConfig:
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads((source / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMSettingError(f"'{source / 'config.json'}' is not a readable JSON config: {e}", ENV_SOURCE) from None
    if not isinstance(raw, dict):
        raise LLMSettingError(f"'{source / 'config.json'}' is not a model config (not a JSON object)", ENV_SOURCE)
    custom = raw.pop("auto_map", None)
    _check_model_type(raw.get("model_type"), source, custom_code=bool(custom))
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def _check_model_type(model_type: str | None, source: Path, custom_code: bool = False) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        detail = (" It declares custom model code (auto_map), which nnunetv2_llm never runs (no trust_remote_code)."
                  if custom_code else "")
        raise LLMSettingError(
            f"model type '{model_type}' of '{source}' is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}.{detail}",
            ENV_SOURCE,
        )


def resolve_layer_index(config: PretrainedConfig, layer: int | str | None) -> int:
    """Layer index from ``layer``, else ``$nnUNet_LLM_LAYER``, else the last layer (as MedVisionLlama).
    Negative indices count from the end."""
    value = layer if layer not in (None, "") else os.environ.get(ENV_LAYER) or -1
    n = config.num_hidden_layers
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise LLMSettingError(f"layer index '{value}' is not an integer", ENV_LAYER) from None
    if not -n <= index < n:
        raise LLMSettingError(f"layer index {index} is out of range: the model has {n} layers (0..{n - 1})", ENV_LAYER)
    return index % n
