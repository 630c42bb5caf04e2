"""GGUF files: the architecture, the config (through transformers), and one layer de-quantised.

Only the requested layer's blocks are de-quantised, with transformers' own name mapping and tensor processors.
A file is parsed once for all reads of one source (``one_source_parse``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.source import ENV_SOURCE, one_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor

    from nnunetv2_llm.llm.blueprint import LayerBlueprint


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: Path):
    """One parse of a GGUF file (its header holds the tokenizer's entries as numpy views, large for a small model);
    shared by the config and the layer read, dropped once the layer is read or a ``one_source_parse`` block ends."""
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
def gguf_speedups() -> Iterator[None]:
    """Within this block, transformers' GGUF helpers take gguf's tensor-name map (which they would rebuild for
    every module) and the file's parse (which they would redo for the config) from a cache."""
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


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (LLMSettingError when the file is not a readable GGUF)."""
    try:
        reader = _gguf_reader(path)
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture field")
        return str(field.contents())
    except Exception as e:
        raise LLMSettingError(f"'{path}' is not a readable GGUF file (truncated or corrupt?): {one_line(e)}",
                              ENV_SOURCE) from None


@functools.lru_cache(maxsize=1)
def gguf_supported_types() -> frozenset[str]:
    """Tensor types gguf's numpy code can de-quantise (F32, F16, BF16 and the quantisations it implements): those
    for which ``gguf.dequantize`` of one all-zero block works."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    supported = set()
    for qtype in GGMLQuantizationType:
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.add(qtype.name)
    return frozenset(supported)


def _layer_tensors(path: Path, index: int) -> list:
    """The GGUF tensors of layer ``index`` (``blk.{index}.*``); refuses a type gguf cannot de-quantise."""
    layer_tensors = [t for t in _gguf_reader(path).tensors if t.name.startswith(f"blk.{index}.")]
    supported = gguf_supported_types()
    for tensor in layer_tensors:
        if tensor.tensor_type.name not in supported:
            raise LLMSettingError(
                f"tensor '{tensor.name}' of GGUF file '{path}' is stored as {tensor.tensor_type.name}, which cannot "
                f"be de-quantised here; supported: {', '.join(sorted(supported))}. Use a GGUF with one of these "
                "quantisations, or the model's safetensors folder", ENV_SOURCE)
    return layer_tensors


def _check_legacy_architecture(path: Path, architecture: str) -> None:
    """Refuse an architecture that transformers reads only through its newer GGUF path (``GGUF_ARCHS``, e.g. qwen35):
    its value transforms (norm offsets, head reorders) are not in the tensor processors used here."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # transformers before the packed loader: every architecture goes through the processors
        return
    if architecture in GGUF_ARCHS and architecture not in GGUF_CONFIG_MAPPING:
        raise LLMSettingError(f"GGUF architecture '{architecture}' of '{path}' is read by transformers' packed GGUF "
                              "loader only, which single-layer reading does not support; use the model's "
                              "safetensors folder", ENV_SOURCE)


def _layer_name_map(blueprint: LayerBlueprint, config: PretrainedConfig, architecture: str, index: int,
                    processor: TensorProcessor) -> dict[str, str]:
    """GGUF name -> HF name for layer ``index``, as transformers maps a ``*ForCausalLM``: the layer sits at its
    path in that model (``model.layers.{index}``), since gguf's name tables list some tensors (phi3's fused QKV,
    starcoder2's MLP) only under it. Only that layer is mapped, whatever the model's depth."""
    from torch import nn
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    model = blueprint.meta_model
    list_path = next(name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
                     and name.split(".")[-1] == blueprint.layer_list_name
                     and len(module) == config.num_hidden_layers)
    holder = nn.Module()
    parent = holder
    for part in [model.base_model_prefix, *list_path.split(".")]:
        parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(str(index), model.get_submodule(f"{list_path}.{index}"))
    return get_gguf_hf_weights_map(holder, processor, model_type=architecture,
                                   num_layers=config.num_hidden_layers)


def read_gguf_layer(path: Path, config: PretrainedConfig, index: int,
                    blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """Layer ``index`` of a GGUF file de-quantised to float32, keys relative to the layer (``mlp.up_proj.weight``).

    Only the ``blk.{index}.*`` tensors are de-quantised (``gguf.dequantize``), then processed and named by
    transformers' own GGUF tensor processor and name mapping for the file's architecture.

    Raises:
        LLMSettingError: the file, its architecture or a tensor type cannot be read.
    """
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    architecture = gguf_architecture(path)
    _check_legacy_architecture(path, architecture)
    layer_tensors = _layer_tensors(path, index)
    try:
        parsed = {"config": config.to_dict(), "tensors": {}}
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        with gguf_speedups():
            name_map = _layer_name_map(blueprint, config, architecture, index, processor)
        pattern = blueprint.key_pattern(index)
        tensors = {}
        for tensor in layer_tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                       parsed_parameters=parsed)
            match = pattern.match(name_map.get(result.name, ""))
            if match:
                tensors[match.group(1)] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    except Exception as e:  # truncated file, unknown architecture, a processor failing on odd shapes
        raise LLMSettingError(f"could not read layer {index} from GGUF file '{path}': {one_line(e)}",
                              ENV_SOURCE) from None
    finally:
        _gguf_reader.cache_clear()  # the tensors are copies: drop the parse and its memory map
    return tensors
