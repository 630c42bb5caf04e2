"""The bottleneck block's settings, stored in the plans so that the model folder is self-contained.

The trainer writes a ``BottleneckSpec`` into ``plans["nnunetv2_llm"]``; nnU-Net copies the plans into the
model folder (``plans.json``), and ``nnUNetv2_predict`` rebuilds the network from it, while the frozen
weights come from the checkpoint. So prediction never needs the LLM source.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnunetv2_llm.common.errors import LLMSettingError, setting_names
from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.llm.config import load_config
from nnunetv2_llm.llm.layer import layer_storage_dtype, storage_dtype
from nnunetv2_llm.llm.layer_range import resolve_layers
from nnunetv2_llm.llm.readers.gguf import one_source_parse
from nnunetv2_llm.llm.source import ENV_LAYER, ENV_SOURCE, resolve_source, source_format
from nnunetv2_llm.model.frozen_layer import weights_dtype
from nnunetv2_llm.model.frozen_stack import read_stack_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PLANS_KEY = "nnunetv2_llm"
PLANS_FILE = "plans.json"  # nnU-Net's copy of the plans in a model folder
MIXERS = ("pretrained", "random", "identity")
LAYER_DTYPES = ("float32", "bfloat16")  # what a trainer may ask the frozen layer to be stored and run in
FROZEN_PREFIX = "bottleneck.mixer.layer."  # where the frozen layer's tensors sit in the network's state dict
# Config entries that say where or with which version a config was read, not what the layer is.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "auto_map", "trust_remote_code")


class PlansUnreadable(LLMSettingError):
    """A model folder's plans.json cannot be read as a JSON object."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"'{path}' is unreadable ({reason})", "the model folder's plans.json")


class MalformedSpec(LLMSettingError):
    """The plans' ``nnunetv2_llm`` block does not describe a ``BottleneckSpec``."""


@dataclass
class BottleneckSpec:
    """Everything needed to rebuild the bottleneck block without the LLM source.

    mixer: 'pretrained' (frozen pre-trained layer), 'random' (same architecture, frozen, random init),
    'identity' (no LLM: the same projections around an identity).
    layer, num_layers: the first layer's index in the source and how many consecutive layers are stacked.
    rank: of the projections into and out of the layer (0: full-rank ``nn.Linear``).
    train_layer: the layer trains with the network (``nnUNetTrainerLLMUnfrozen``): its checksum is that of the
        weights it started from.
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
    num_layers: int = 1
    train_layer: bool = False

    @property
    def layers(self) -> range:
        """The source's layer indices in the block, in order (``layer`` is the first of ``num_layers``)."""
        return range(self.layer, self.layer + self.num_layers)

    @property
    def layer_label(self) -> str:
        """``31``, or ``20:24`` for a stack (the form ``nnUNet_LLM_LAYER`` takes)."""
        return str(self.layer) if self.num_layers == 1 else f"{self.layer}:{self.layer + self.num_layers}"

    @property
    def width(self) -> int:
        """The LLM's hidden size (GPT-2 stores it as ``n_embd``: read through the config's attribute map)."""
        hidden = self.llm_config.get("hidden_size")
        return int(hidden if hidden is not None else self.hf_config().hidden_size)

    def hf_config(self) -> PretrainedConfig:
        """The transformers config object, rebuilt from the stored dict (no file access)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **{k: v for k, v in self.llm_config.items()
                                                        if k != "model_type" and k not in VOLATILE_CONFIG_KEYS})

    def identity_for_comparison(self) -> dict:
        """What must match between a saved model folder and the current settings, in JSON form (so that a spec
        read back from plans.json compares equal to a fresh one: JSON turns integer dict keys into strings)."""
        d = asdict(self)
        d.pop("source")  # the same weights may live at another path on another machine
        d["llm_config"] = {k: v for k, v in d["llm_config"].items() if k not in VOLATILE_CONFIG_KEYS}
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def differences(self, other: "BottleneckSpec") -> list[str]:
        """Readable differences to ``other`` (``name: self-value vs other-value``), empty when they match."""
        mine, theirs = self.identity_for_comparison(), other.identity_for_comparison()
        out = []
        for key in sorted(mine.keys() | theirs.keys()):
            if key == "llm_config":
                a, b = mine.get(key, {}), theirs.get(key, {})
                out += [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                        if a.get(k) != b.get(k)]
            elif mine.get(key) != theirs.get(key):
                out.append(f"{key}: {_short(mine.get(key))} vs {_short(theirs.get(key))}")
        return out

    def to_plans(self, plans: dict) -> None:
        plans[PLANS_KEY] = asdict(self)

    @classmethod
    def from_model_folder(cls, folder: str | Path, required: bool = True) -> BottleneckSpec | None:
        """The spec stored in a model folder's ``plans.json`` (the one reader of that file's block).

        Args:
            folder: a trainer folder (``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``).
            required: raise when plans.json has no block (else return None: a plain nnU-Net model folder).

        Returns:
            The spec, or None when ``required`` is False and plans.json carries no ``nnunetv2_llm`` block.

        Raises:
            PlansUnreadable: plans.json is missing, unreadable or not a JSON object.
            MalformedSpec: the block lacks fields or has unknown ones (hand-edited, or another version's).
            LLMSettingError: (``required``) plans.json carries no block.
        """
        path = Path(folder) / PLANS_FILE
        try:
            plans = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PlansUnreadable(path, str(e)) from None
        if not isinstance(plans, dict):
            raise PlansUnreadable(path, "not a JSON object")
        if not required and PLANS_KEY not in plans:
            return None
        return cls.from_plans(plans)

    @classmethod
    def from_plans(cls, plans: dict) -> "BottleneckSpec":
        if PLANS_KEY not in plans:
            raise LLMSettingError(
                "these plans carry no nnunetv2_llm block settings; the model folder was not trained with an "
                "nnunetv2_llm trainer, or its plans.json was replaced", "the model folder's plans.json"
            )
        block = plans[PLANS_KEY]
        try:
            return cls(**block)
        except TypeError as e:  # a hand-edited or foreign block: missing or unknown fields
            raise MalformedSpec(f"the plans' nnunetv2_llm block is malformed ({e}); was plans.json edited or written "
                                "by another version?", "the model folder's plans.json") from None


@dataclass(frozen=True)
class LLMChoice:
    """The LLM settings a trainer or command asks for; ``make_spec`` resolves and validates them.

    mixer: 'pretrained', 'random' or 'identity' (see ``BottleneckSpec``).
    source: a Hugging Face model folder or a ``.gguf`` file; None: ``$nnUNet_LLM_SOURCE``, else the embedded
        default (SmolLM2-135M).
    layer: the layer index (negative counts from the end) or a half-open range ``START:END`` of consecutive layers
        (``llm.layer_range``); None: ``$nnUNet_LLM_LAYER``, else the last layer.
    rank: rank of the low-rank projections into and out of the layer (0: full-rank).
    lora_rank, lora_alpha: LoRA adapters on the frozen layer's linears (rank 0: none).
    seed: initialisation seed of the random-layer control.
    dtype: 'float32' or 'bfloat16' to store and run the frozen layer in; None: the dtype its source stores it in
        (``frozen_layer.weights_dtype``).
    train_layer: the pre-trained (or random) layer trains with the network instead of staying frozen.
    source_setting, layer_setting: the names errors give the source and the layer when they were passed here (the
        command's flags); values taken from the environment are named by its variables.
    """

    mixer: str
    source: str | os.PathLike | None = None
    layer: int | str | None = None
    rank: int = 64
    lora_rank: int = 0
    lora_alpha: int = 16
    seed: int = 0
    dtype: str | None = None
    train_layer: bool = False
    source_setting: str = "--llm-source"
    layer_setting: str = "--llm-layer"

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}")
        if self.dtype not in (None, *LAYER_DTYPES):
            raise ValueError(f"dtype must be None or one of {LAYER_DTYPES}")

    def setting_aliases(self) -> dict[str, str]:
        """Environment variable -> the setting name for the values given here (for ``setting_names``)."""
        aliases = {}
        if self.source not in (None, ""):
            aliases[ENV_SOURCE] = self.source_setting
        if self.layer not in (None, ""):
            aliases[ENV_LAYER] = self.layer_setting
        return aliases


def make_spec(choice: LLMChoice) -> BottleneckSpec:
    """Resolve and validate an LLM choice (reads the config and, for 'pretrained', the layer's checksum)."""
    return make_spec_and_layer(choice)[0]


def make_spec_and_layer(choice: LLMChoice) -> tuple[BottleneckSpec, dict[str, torch.Tensor] | None]:
    """``make_spec``, also returning the layer's tensors it read, in the spec's dtype (for 'pretrained'; None
    otherwise), so that the network can be built from them (``network.reuse_layer``) instead of reading the
    source a second time."""
    with setting_names(**choice.setting_aliases()):
        path = resolve_source(choice.source)
        with one_source_parse():
            config = load_config(path)
            layers = resolve_layers(config, choice.layer)
            blueprint = layer_blueprint(config)
            if choice.mixer == "pretrained":
                state = read_stack_state_dict(path, config, layers, blueprint)
                source_dtype = storage_dtype(state)
            else:  # the controls use no pre-trained weights: only the dtype they are stored in
                state, source_dtype = None, layer_storage_dtype(path, config, layers[0], blueprint)
    dtype = getattr(torch, choice.dtype) if choice.dtype else weights_dtype(source_dtype)
    for key in state or ():  # into the network's dtype one tensor at a time: never a second copy of the layer
        state[key] = state[key].to(dtype)
    spec = BottleneckSpec(
        mixer=choice.mixer, source=str(path), source_format=source_format(path), layer=layers[0],
        model_type=config.model_type, llm_config=config.to_dict(), dtype=str(dtype).removeprefix("torch."),
        layer_sha256=state_dict_sha256(state, dtype) if choice.mixer == "pretrained" else "",
        rank=choice.rank, lora_rank=choice.lora_rank, lora_alpha=choice.lora_alpha, seed=choice.seed,
        num_layers=len(layers), train_layer=choice.train_layer,
    )
    return spec, state


def state_dict_sha256(state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """Checksum of a layer's tensors as stored in the network (key order independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_layer_sha256(network_state: dict[str, torch.Tensor], dtype: torch.dtype | str,
                        prefix: str = FROZEN_PREFIX) -> str:
    """``state_dict_sha256`` of the frozen layer inside a network's (or checkpoint's) state dict: the tensors
    under ``prefix``, without LoRA adapters, with peft's ``.base_layer`` renaming undone. Equals the spec's
    ``layer_sha256`` when the frozen weights are bit-identical to the source's."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    layer = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in network_state.items()
             if k.startswith(prefix) and "lora_" not in k}
    return state_dict_sha256(layer, dtype)


def frozen_layer_differs(network_state: dict[str, torch.Tensor], spec: BottleneckSpec,
                         expected: str | None = None, prefix: str = FROZEN_PREFIX) -> str | None:
    """The one check that a network's (or checkpoint's) frozen layer is the one it should be.

    Args:
        network_state: a network's or checkpoint's state dict (keys under ``prefix`` hold the frozen layer).
        spec: the spec whose layer is expected (its dtype is used for the checksum).
        expected: the expected checksum; default the spec's ``layer_sha256`` (the pre-trained layer's).

    Returns:
        The found checksum when it differs from ``expected``, else None (also for the no-LLM control, a layer that
        trains with the network, and a spec without a stored checksum when no ``expected`` is given).
    """
    expected = expected if expected is not None else spec.layer_sha256
    if spec.mixer == "identity" or spec.train_layer or not expected:
        return None
    found = frozen_layer_sha256(network_state, spec.dtype, prefix)
    return found if found != expected else None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
