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


def gguf_supported_types() -> set[str]:
    """Tensor types gguf's numpy code can de-quantise (F32, F16 and the quantisations it implements)."""
    from gguf import GGMLQuantizationType, quants

    return {"F32", "F16"} | {t.name for t in GGMLQuantizationType if t in getattr(quants, "_type_traits", {})}


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


def read_gguf_layer(path: Path, config: PretrainedConfig, index: int,
                    blueprint: LayerBlueprint) -> dict[str, torch.Tensor]:
    """Layer ``index`` of a GGUF file de-quantised to float32, keys relative to the layer (``mlp.up_proj.weight``)."""
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture = gguf_architecture(path)
    layer_tensors = _layer_tensors(path, index)
    try:
        parsed = {"config": config.to_dict()}
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        with gguf_speedups():
            name_map = get_gguf_hf_weights_map(blueprint.meta_model, processor)
        pattern = blueprint.key_pattern(index)
        tensors = {}
        for tensor in layer_tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                       parsed_parameters=parsed)
            match = pattern.match(name_map.get(result.name, ""))
            if match:
                tensors[match.group(1)] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    except Exception as e:  # unsupported quantisation, truncated file, unknown architecture
        raise LLMSettingError(f"could not read layer {index} from GGUF file '{path}': {one_line(e)}",
                              ENV_SOURCE) from None
    finally:
        _gguf_reader.cache_clear()  # the tensors are copies: drop the parse and its memory map
    return tensors
