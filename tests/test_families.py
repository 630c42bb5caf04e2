"""Any transformers language-model family at the bottleneck: the family rule, positions and bidirectional attention.

Each accepted family is checked on a tiny random model saved as safetensors: the project's frozen layer equals the
same layer inside the full transformers model (eager attention, an all-visible mask, the model's own positions), and
its first token sees its last one, also past a sliding window.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.llm.blueprint import check_layer, layer_blueprint
from nnunetv2_llm.llm.config import load_config
from nnunetv2_llm.llm.layer import read_layer_state_dict
from nnunetv2_llm.model.frozen_layer import FrozenLLMLayer

TOKENS = 12  # more than WINDOW: sliding-window layers must still attend to every token
WINDOW = 4
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, max_position_embeddings=512)
# Settings that make a family's tiny config consistent or exercise its position scheme.
FAMILIES = {
    "llama": {}, "mistral": dict(sliding_window=WINDOW), "qwen3": {}, "gemma": dict(head_dim=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0), "phi": dict(partial_rotary_factor=0.5), "stablelm": dict(partial_rotary_factor=0.25),
    "starcoder2": dict(sliding_window=WINDOW), "olmo2": {}, "granite": {}, "gpt2": {}, "biogpt": {},
    "bert": {}, "roberta": dict(pad_token_id=1), "olmo": {}, "olmo3": dict(sliding_window=WINDOW), "cohere": {},
    "glm": dict(pad_token_id=0), "glm4": dict(pad_token_id=0), "helium": dict(head_dim=16),
    "smollm3": dict(pad_token_id=0), "gpt_neox": dict(rotary_pct=0.5),
    "persimmon": {}, "opt": dict(ffn_dim=128, word_embed_proj_dim=64), "xglm": {}, "gpt_bigcode": {},
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=WINDOW, pad_token_id=0),
    "electra": dict(embedding_size=64), "distilbert": {},
    "gpt_neo": dict(attention_types=[[["global", "local", "global"], 1]], window_size=WINDOW),
    "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8), "ctrl": {}, "cohere2": dict(sliding_window=WINDOW),
    "ernie4_5": {}, "exaone4": dict(sliding_window=WINDOW), "diffllama": {}, "nanochat": {}, "seed_oss": {},
    "arcee": {}, "ministral3": {}, "vaultgemma": dict(head_dim=16), "xlm-roberta": dict(pad_token_id=1),
    "camembert": dict(pad_token_id=1), "megatron-bert": {}, "gpt-sw3": {}, "eurobert": dict(pad_token_id=0),
    "modernbert-decoder": dict(pad_token_id=0), "bitnet": {}, "doge": {}, "falcon": {},
}


def save_tiny(folder: Path, model_type: str) -> Path:
    """A tiny random base model of ``model_type`` saved as safetensors."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILIES.get(model_type, {})})
    model = AutoModel.from_config(config)
    with torch.no_grad():  # some families initialise norms to exactly 1 and biases to 0: perturb them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_layer_io(folder: Path, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s input and output inside the full model run on ``hidden`` (B, N, D) as input embeddings,
    with eager attention and an all-visible mask given to that layer (positions are the model's own)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    for module in model.modules():  # GPT-Neo keeps its causal (and local) mask in a boolean buffer: open it
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.dtype == torch.bool:
            bias.fill_(True)
    stack = next(m for m in model.modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers)
    seen = {}

    def visible(module, args, kwargs):
        b, n = args[0].shape[:2]
        mask = torch.zeros(b, 1, n, n, dtype=args[0].dtype)
        position = list(inspect.signature(module.forward).parameters).index("attention_mask")
        if position < len(args):
            args = (*args[:position], mask, *args[position + 1:])
        else:
            kwargs["attention_mask"] = mask
        seen["input"] = args[0].detach().clone()
        return args, kwargs

    def output(module, args, kwargs, out):
        seen["output"] = (out[0] if isinstance(out, tuple) else out).detach()

    stack[index].register_forward_pre_hook(visible, with_kwargs=True)
    stack[index].register_forward_hook(output, with_kwargs=True)
    with torch.no_grad():
        model(inputs_embeds=hidden, attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long))
    return seen["input"], seen["output"]


def project_layer(folder: Path, index: int) -> FrozenLLMLayer:
    config = load_config(folder)
    blueprint = layer_blueprint(config)
    state = read_layer_state_dict(folder, config, index, blueprint)
    return FrozenLLMLayer.from_state_dict(blueprint, config, index, state, torch.float32)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_layer_equals_the_full_models_layer_and_is_bidirectional(tmp_path, model_type):
    folder = save_tiny(tmp_path / model_type, model_type)
    for index in (0, 1):  # two layers: Gemma-3's and ModernBERT's sliding and global attention types differ
        torch.manual_seed(index)
        hidden = torch.randn(2, TOKENS, 64)
        layer_input, expected = reference_layer_io(folder, index, hidden)
        layer = project_layer(folder, index)
        with torch.no_grad():
            out = layer(layer_input)
            changed = layer_input.clone()
            changed[:, -1] = 10 * torch.randn_like(changed[:, -1])
            first = layer(changed)[:, 0]
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
        assert (first - out[:, 0]).abs().max() > 1e-4  # the first token sees the last (past any window)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_project_path_builds_the_same_layer(tmp_path, model_type):
    """``make_spec`` + ``build_mixer`` (what the trainers run) give the layer tested above, and so does the
    predictor's path: the spec read back from plans.json, a placeholder mixer, the checkpoint's weights, no source."""
    import dataclasses
    import json

    from nnunetv2_llm.model.network import build_mixer
    from nnunetv2_llm.model.spec import BottleneckSpec, LLMChoice, make_spec

    tokens = torch.randn(1, TOKENS, 64)
    folder = save_tiny(tmp_path / model_type, model_type)
    spec = make_spec(LLMChoice("pretrained", source=str(folder), layer=1))
    mixer = build_mixer(spec)
    expected = project_layer(folder, 1)(tokens).detach()
    plans: dict = {}
    spec.to_plans(plans)
    read_back = BottleneckSpec.from_plans(json.loads(json.dumps(plans, default=str)))
    placeholder = build_mixer(dataclasses.replace(read_back, source=str(tmp_path / "gone")), from_checkpoint=True)
    placeholder.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mixer(tokens), expected)
        torch.testing.assert_close(placeholder(tokens), expected)


def tiny_config_folder(folder: Path, model_type: str, **overrides) -> Path:
    """A folder with a tiny config of ``model_type`` and a placeholder weights file (refusals come before reads)."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **{**TINY, **overrides}).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("model_type", "overrides", "reason"), [
    ("mixtral", {}, "mixture-of-experts layer (MixtralSparseMoeBlock)"),
    ("mamba", {}, "state-space, recurrent or convolutional token mixer"),
    ("lfm2", dict(layer_types=["conv", "full_attention", "conv"]), "convolutional token mixer (Lfm2ShortConv)"),
    ("bloom", {}, "ALiBi attention bias"),
    ("falcon", dict(alibi=True), "ALiBi attention bias"),
    ("t5", {}, "an encoder-decoder model"),
    ("gemma3", {}, "a composite of sub-models (text_config, vision_config"),
    ("gte", {}, "checkpoint conversion mapping"),
])
def test_refused_families_name_their_reason_in_one_line(tmp_path, capsys, model_type, overrides, reason):
    from nnunetv2_llm import cli

    folder = tiny_config_folder(tmp_path / model_type, model_type, **overrides)
    assert cli.main(["info", "--llm-source", str(folder), "--llm-layer", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"model type '{model_type}'" in err and "is not supported" in err and reason in err
    assert "(fix: --llm-source)" in err


def test_a_hybrid_models_attention_layer_is_accepted_and_its_conv_layer_refused(tmp_path):
    folder = save_tiny(tmp_path / "lfm2", "lfm2")  # FAMILIES has no entry: the default layer types of 3 layers
    config = load_config(folder)
    kinds = config.layer_types
    blueprint = layer_blueprint(config)
    for index, kind in enumerate(kinds):
        if kind == "full_attention":
            assert check_layer(blueprint, config, index).rotary_cls is not None
        else:
            with pytest.raises(LLMSettingError, match="convolutional token mixer"):
                check_layer(blueprint, config, index)


def test_a_built_in_causal_mask_is_opened_or_the_family_refused(tmp_path, monkeypatch):
    """GPT-Neo keeps its causal mask in a buffer; without opening it, the layer check refuses the family."""
    import nnunetv2_llm.llm.bidirectional as bidirectional

    folder = save_tiny(tmp_path / "gpt_neo", "gpt_neo")
    project_layer(folder, 0)  # opened: accepted
    monkeypatch.setattr(bidirectional, "_open_causal_buffers", lambda module: None)
    with pytest.raises(LLMSettingError, match="attention stays causal"):
        project_layer(folder, 0)


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", "rotary"), ("stablelm", "rotary on 20 of 80 head dimensions (partial)"),
    ("gpt_neox", "rotary on 24 of 96 head dimensions (partial)"), ("gptj", "rotary on 64 of 256 head dimensions"),
    ("gemma3_text", "rotary, base of its attention type 'sliding_attention'"),
    ("gpt2", "none in the layer (absolute positions live in the embedding layer: wpe)"),
    ("mixtral", "mixture-of-experts"), ("bert", "embeddings.position_embeddings"),
])
def test_classify_family_on_transformers_defaults(model_type, expected):
    from nnunetv2_llm.llm.family_list import classify_family

    verdict = classify_family(model_type)
    assert expected in (verdict.positions or verdict.refusal)
    assert verdict.accepted == (model_type != "mixtral")


def test_list_families_text():
    from nnunetv2_llm.llm.families import FamilyVerdict
    from nnunetv2_llm.tools.info import family_lines

    lines = family_lines([FamilyVerdict("llama", positions="rotary"), FamilyVerdict("mamba", refusal="recurrent")])
    assert lines == ["supported model types (1; positions the layer takes):", "  llama  rotary",
                     "refused model types (1; judged on transformers' default config and its last layer):",
                     "  mamba  recurrent"]


def test_list_families_command_and_its_cache(tmp_path, capsys, monkeypatch):
    """The command judges every type (here two, for speed) and caches the verdicts for the next run."""
    import nnunetv2_llm.llm.family_list as family_list
    from nnunetv2_llm import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(family_list, "language_model_types", lambda: ["llama", "mixtral"])
    assert cli.main(["info", "--list-families"]) == 0
    first = capsys.readouterr().out
    assert "  llama    rotary" in first and "  mixtral  layer 31 is a mixture-of-experts layer" in first
    assert len(list((tmp_path / "nnunetv2_llm").glob("families-*.json"))) == 1

    def refuse(model_type):
        raise AssertionError("judged again instead of read from the cache")

    monkeypatch.setattr(family_list, "classify_family", refuse)
    assert cli.main(["info", "--list-families"]) == 0
    assert capsys.readouterr().out == first


def test_info_prints_the_positions_of_the_chosen_layers(tmp_path, capsys):
    from nnunetv2_llm import cli

    folder = save_tiny(tmp_path / "phi", "phi")
    assert cli.main(["info", "--llm-source", str(folder), "--llm-layer", "0:2"]) == 0
    out = capsys.readouterr().out
    assert "positions:   rotary on 8 of 16 head dimensions (partial)\n" in out
