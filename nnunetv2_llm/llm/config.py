"""The model's config, read from local files without running remote code, and the layer index to use.

A folder's ``config.json`` is parsed here and handed to transformers' config class of its ``model_type`` when
``families.config_refusal`` accepts the family (the chosen layer is checked when it is built: ``blueprint``); an
``auto_map`` entry pointing to custom code in the folder is dropped, never imported. A GGUF file's config comes
from transformers' GGUF loader, for every architecture it maps to a family accepted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.families import config_refusal
from nnunetv2_llm.llm.readers.gguf import gguf_architecture, gguf_speedups
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line, source_format

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def load_config(source: Path) -> PretrainedConfig:
    """Read the model's ``PretrainedConfig`` from local files only, without running remote code."""
    fmt = source_format(source)
    try:
        config = _gguf_config(source) if fmt == "gguf" else _folder_config(source)
    except LLMSettingError:
        raise
    except Exception as e:  # transformers/gguf raise many types for unreadable or unsupported files
        raise LLMSettingError(f"could not read a model config from '{source}': {one_line(e)}", ENV_SOURCE) from None
    _check_family(config, source)
    for attribute in ("auto_map", "trust_remote_code"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


def _gguf_config(source: Path) -> PretrainedConfig:
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architecture = gguf_architecture(source)
    try:
        with gguf_speedups():
            config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except Exception as e:
        if "not supported" in str(e).lower():
            raise LLMSettingError(f"GGUF architecture '{architecture}' of '{source}' is not supported by "
                                  f"transformers' GGUF loader; it maps: {', '.join(sorted(GGUF_CONFIG_MAPPING))}",
                                  ENV_SOURCE) from None
        raise
    return config  # its family is checked by load_config, as a folder's


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
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        detail = (" It declares custom model code (auto_map), which nnunetv2_llm never runs (no trust_remote_code)."
                  if custom_code else "")
        raise LLMSettingError(f"model type '{model_type}' of '{source}' is not supported: not a transformers model "
                              f"type (`nnunetv2_llm info --list-families` lists the supported ones).{detail}",
                              ENV_SOURCE)


def _check_family(config: PretrainedConfig, source: Path) -> None:
    reason = config_refusal(config)
    if reason:
        raise LLMSettingError(f"model type '{config.model_type}' of '{source}' is not supported: {reason}", ENV_SOURCE)
