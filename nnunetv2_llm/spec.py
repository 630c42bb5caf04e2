"""The bottleneck block's settings, stored in the plans so that the model folder is self-contained.

The trainer writes a ``BottleneckSpec`` into ``plans["nnunetv2_llm"]``; nnU-Net copies the plans into the
model folder (``plans.json``), and ``nnUNetv2_predict`` rebuilds the network from it, while the frozen
weights come from the checkpoint. So prediction never needs the LLM source.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nnunetv2_llm.errors import LLMSettingError
from nnunetv2_llm.llm_source import (
    layer_blueprint, load_config, read_layer_state_dict, resolve_layer_index, resolve_source, source_format,
)

PLANS_KEY = "nnunetv2_llm"
MIXERS = ("pretrained", "random", "identity")


@dataclass
class BottleneckSpec:
    """Everything needed to rebuild the bottleneck block without the LLM source.

    mixer: 'pretrained' (frozen pre-trained layer), 'random' (same architecture, frozen, random init),
    'identity' (no LLM: the same projections around an identity).
    """

    mixer: str
    source: str
    source_format: str
    layer: int
    model_type: str
    llm_config: dict
    dtype: str
    layer_sha256: str = ""
    rank: int = 64
    lora_rank: int = 0
    lora_alpha: int = 16
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.llm_config["hidden_size"])

    def hf_config(self):
        """The transformers config object, rebuilt from the stored dict (no file access)."""
        from transformers import AutoConfig

        config = AutoConfig.for_model(self.model_type, **{k: v for k, v in self.llm_config.items() if k != "model_type"})
        config._attn_implementation = "sdpa"
        return config

    def identity_for_comparison(self) -> dict:
        """What must match between a saved model folder and the current settings."""
        d = asdict(self)
        d.pop("source")  # the same weights may live at another path on another machine
        d.pop("extra")
        return d

    def to_plans(self, plans: dict) -> None:
        plans[PLANS_KEY] = asdict(self)

    @classmethod
    def from_plans(cls, plans: dict) -> "BottleneckSpec":
        if PLANS_KEY not in plans:
            raise LLMSettingError(
                "these plans carry no nnunetv2_llm block settings; the model folder was not trained with an "
                "nnunetv2_llm trainer, or its plans.json was replaced", "the model folder's plans.json"
            )
        return cls(**plans[PLANS_KEY])


def make_spec(mixer: str, source: str | None = None, layer: int | str | None = None, rank: int = 64,
              lora_rank: int = 0, lora_alpha: int = 16, seed: int = 0) -> BottleneckSpec:
    """Resolve and validate an LLM choice (reads the config and, for 'pretrained', the layer's checksum)."""
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}")
    path = resolve_source(source)
    config = load_config(path)
    index = resolve_layer_index(config, layer)
    blueprint = layer_blueprint(config)
    state = read_layer_state_dict(path, config, index, blueprint)
    from nnunetv2_llm.frozen_layer import weights_dtype

    dtype = weights_dtype(next(iter(state.values())).dtype)
    return BottleneckSpec(
        mixer=mixer, source=str(path), source_format=source_format(path), layer=index,
        model_type=config.model_type, llm_config=config.to_dict(), dtype=str(dtype).removeprefix("torch."),
        layer_sha256=state_dict_sha256(state, dtype) if mixer == "pretrained" else "",
        rank=rank, lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed,
    )


def state_dict_sha256(state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """Checksum of a layer's tensors as stored in the network (key order independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_available(spec: BottleneckSpec) -> bool:
    return Path(spec.source).exists()
