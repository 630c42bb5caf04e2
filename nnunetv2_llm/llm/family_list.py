"""Every transformers language-model family judged by the rule (``nnunetv2_llm info --list-families``).

Each family is judged on transformers' default config of its type and that config's last layer (the default
layer), built on the meta device. Judging about 230 types takes tens of seconds on two cores, so the verdicts are
cached per transformers version and version of the rule's code (``$XDG_CACHE_HOME/nnunetv2_llm``, default
``~/.cache``); a cache that cannot be written is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from nnunetv2_llm.common.atomic_files import atomic_file
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm import bidirectional, blueprint, families, positions
from nnunetv2_llm.llm.blueprint import FamilyRefused, check_layer, layer_blueprint
from nnunetv2_llm.llm.families import FamilyVerdict, language_model_types
from nnunetv2_llm.llm.source import one_line

_RULE_MODULES = (families, positions, blueprint, bidirectional)


def classify_family(model_type: str) -> FamilyVerdict:
    """Accepted (with its position scheme) or refused (with the reason), judged on transformers' default config of
    ``model_type`` and its last layer; builds on the meta device only."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except Exception as e:  # a config class that needs arguments
        return FamilyVerdict(model_type, refusal=f"its default config cannot be made: {one_line(e)}")
    try:
        built = layer_blueprint(config)
        scheme = check_layer(built, config, config.num_hidden_layers - 1).scheme
    except FamilyRefused as e:
        return FamilyVerdict(model_type, refusal=e.reason)
    except LLMSettingError as e:  # the default config builds no model: a real checkpoint's config may
        return FamilyVerdict(model_type, refusal=f"not classified: {e.detail}")
    if _hybrid(config, built.stack):
        scheme += " (hybrid stack: its other layer kinds are refused)"
    return FamilyVerdict(model_type, positions=scheme)


def _hybrid(config, stack) -> bool:
    """Whether the stack mixes layer kinds: several classes, or layer types other than (sliding) attention."""
    kinds = {type(layer) for layer in stack}
    types = set(getattr(config, "layer_types", None) or ())
    return len(kinds) > 1 or bool(types - {"full_attention", "sliding_attention", "chunked_attention"})


def classify_families(use_cache: bool = True) -> list[FamilyVerdict]:
    """``classify_family`` of every language-model type transformers knows, sorted by type, from the cache when it
    holds this transformers version's and this rule's verdicts (transformers' warnings about the default configs
    are silenced meanwhile)."""
    cache = _cache_path()
    if use_cache and cache.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            return [FamilyVerdict(**v) for v in json.loads(cache.read_text())]
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdicts = [classify_family(model_type) for model_type in language_model_types()]
    finally:
        logging.set_verbosity(verbosity)
    with contextlib.suppress(OSError):  # a read-only home: no cache, same answer
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache, "w") as f:
            json.dump([asdict(v) for v in verdicts], f)
    return verdicts


def _cache_path() -> Path:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())
    for module in _RULE_MODULES:
        digest.update(Path(module.__file__).read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "nnunetv2_llm" / f"families-{digest.hexdigest()[:16]}.json"
