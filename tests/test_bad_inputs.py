"""Bad input: one clear message naming the setting to fix, a non-zero exit, and no traceback.

Through ``nnunetv2_llm info`` (in this process, through cli.main), through ``nnUNetv2_train`` (real subprocesses),
through the trainer's checkpoint loading, and through ``nnunetv2_llm predict``'s input checks.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from reliability_helpers import (
    fold_dir,
    make_trainer,
    no_traceback,
    run_command,
    train,
    train_env,
)

from nnunetv2_llm import cli
from nnunetv2_llm.model.spec import PLANS_KEY, LLMChoice, make_spec

LLM_ENV = ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER", "nnUNet_LLM_ALLOW_PICKLE")


@pytest.fixture(autouse=True)
def clean_llm_env(monkeypatch):
    for name in LLM_ENV:
        monkeypatch.delenv(name, raising=False)


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr, which is returned."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.out[-2000:], captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("nnunetv2_llm: error: "), captured.err
    return lines[0]


# ------------------------------------------------------------------------------------------ tiny LLM sources
def write_tiny_gguf(path: Path, arch: str = "llama", layer_type: str | None = None, n_layers: int = 2,
                    hidden: int = 64, heads: int = 4, kv: int = 2, ff: int = 128, vocab: int = 32) -> Path:
    """A tiny GGUF (F32 tensors); ``layer_type`` stores each layer's attn_q in that quantisation instead."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def t(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", t(vocab, hidden))
    for i in range(n_layers):
        tensors = {"attn_norm": np.ones(hidden, np.float32), "ffn_norm": np.ones(hidden, np.float32),
                   "attn_q": t(hidden, hidden), "attn_k": t(kv * head_dim, hidden), "attn_v": t(kv * head_dim, hidden),
                   "attn_output": t(hidden, hidden), "ffn_gate": t(ff, hidden), "ffn_up": t(ff, hidden),
                   "ffn_down": t(hidden, ff)}
        for name, array in tensors.items():
            if layer_type is not None and name == "attn_q":
                qtype = getattr(gguf.GGMLQuantizationType, layer_type)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
                writer.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=qtype)
            else:
                writer.add_tensor(f"blk.{i}.{name}.weight", array)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", t(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def single_file_llama(tmp_path_factory) -> Path:
    """A 3-layer tiny Llama in one model.safetensors (hidden 64)."""
    return save_tiny_model(tmp_path_factory.mktemp("single_llama"), "llama")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------- info
def test_missing_source_names_the_flag_or_the_env_var(capsys, tmp_path, monkeypatch):
    line = cli_error(capsys, "info", "--llm-source", str(tmp_path / "nope"))
    assert "does not exist" in line and "(fix: --llm-source)" in line
    monkeypatch.setenv("nnUNet_LLM_SOURCE", str(tmp_path / "nope"))
    line = cli_error(capsys, "info")
    assert "does not exist" in line and "(fix: nnUNet_LLM_SOURCE)" in line


def test_layer_out_of_range_names_the_flag_or_the_env_var(capsys, single_file_llama, monkeypatch):
    line = cli_error(capsys, "info", "--llm-source", str(single_file_llama), "--llm-layer", "3")
    assert "layer index 3 is out of range: the model has 3 layers (0..2)" in line and "(fix: --llm-layer)" in line
    line = cli_error(capsys, "info", "--llm-source", str(single_file_llama), "--llm-layer", "-4")
    assert "out of range" in line
    line = cli_error(capsys, "info", "--llm-source", str(single_file_llama), "--llm-layer", "last")
    assert "neither an integer index nor a range" in line
    line = cli_error(capsys, "info", "--llm-source", str(single_file_llama), "--llm-layer", "0:4")
    assert "bound 4 is outside the model's 3 layers" in line and "(fix: --llm-layer)" in line
    line = cli_error(capsys, "info", "--llm-source", str(single_file_llama), "--llm-layer", "2:1")
    assert "selects no layer" in line
    monkeypatch.setenv("nnUNet_LLM_SOURCE", str(single_file_llama))
    monkeypatch.setenv("nnUNet_LLM_LAYER", "99")
    line = cli_error(capsys, "info")
    assert "layer index 99 is out of range" in line and "(fix: nnUNet_LLM_LAYER)" in line


def test_files_that_are_not_models(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "is not a model" in cli_error(capsys, "info", "--llm-source", str(text))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in cli_error(capsys, "info", "--llm-source", str(empty))
    (empty / "config.json").write_text('{"model_type": "llama"}')
    assert "has no *.safetensors weights" in cli_error(capsys, "info", "--llm-source", str(empty))
    (empty / "model.safetensors").write_bytes(b"")
    (empty / "config.json").write_text("{not json")
    assert "not a readable JSON config" in cli_error(capsys, "info", "--llm-source", str(empty))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert "not a readable GGUF file" in cli_error(capsys, "info", "--llm-source", str(fake_gguf))


def test_unsupported_model_type(capsys, tmp_path):
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64,
                                                    "intermediate_size": 128, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "vocab_size": 97}))
    (folder / "model.safetensors").write_bytes(b"")
    line = cli_error(capsys, "info", "--llm-source", str(folder))
    assert "mixtral" in line and "mixture-of-experts" in line


def test_truncated_and_corrupted_safetensors(capsys, tmp_path, single_file_llama):
    truncated = copy_model(single_file_llama, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = cli_error(capsys, "info", "--llm-source", str(truncated))
    assert "corrupt or incomplete safetensors" in line

    garbled = copy_model(single_file_llama, tmp_path / "garbled")
    (garbled / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])  # header length field destroyed
    assert "corrupt or incomplete safetensors" in cli_error(capsys, "info", "--llm-source", str(garbled))

    # values destroyed but the file well-formed: NaN in a weight of the chosen layer
    from safetensors.torch import load_file, save_file

    nan_model = copy_model(single_file_llama, tmp_path / "nan")
    tensors = load_file(nan_model / "model.safetensors")
    key = next(k for k in tensors if ".layers.2.mlp.down_proj.weight" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan_model / "model.safetensors", metadata={"format": "pt"})
    line = cli_error(capsys, "info", "--llm-source", str(nan_model), "--llm-layer", "2")
    assert "holds NaN/Inf values in 'mlp.down_proj.weight'" in line and "corrupt" in line
    assert make_spec(LLMChoice("pretrained", source=str(nan_model), layer=1)).layer == 1  # other layers are fine


def test_sharded_index_pointing_to_a_missing_shard(capsys, tmp_path, tiny_llama):
    sharded = copy_model(tiny_llama, tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = next(v for k, v in index["weight_map"].items() if ".layers.1." in k)
    (sharded / shard).unlink()
    line = cli_error(capsys, "info", "--llm-source", str(sharded), "--llm-layer", "1")
    assert "could not read layer 1" in line and "(fix: --llm-source)" in line


def test_gguf_unsupported_architecture_and_quantisation(capsys, tmp_path):
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert make_spec(LLMChoice("pretrained", source=str(good), layer=1)).width == 64  # the writer makes valid files
    line = cli_error(capsys, "info", "--llm-source", str(write_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")))
    assert "GGUF architecture 'rwkv6'" in line and "not supported" in line
    q8k = write_tiny_gguf(tmp_path / "q8k.gguf", layer_type="Q8_K")
    line = cli_error(capsys, "info", "--llm-source", str(q8k), "--llm-layer", "1")
    assert "stored as Q8_K, which cannot be de-quantised" in line and "Q4_1" in line
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    assert "not a readable GGUF file" in cli_error(capsys, "info", "--llm-source", str(truncated))


def test_subprocess_cli_prints_one_line_without_traceback(tmp_path):
    run = run_command(["nnunetv2_llm", "info", "--llm-source", str(tmp_path / "missing"), "--llm-layer", "3"],
                      {**__import__("os").environ})
    assert run.returncode == 2 and no_traceback(run.output)
    assert run.output.strip().splitlines()[-1].startswith("nnunetv2_llm: error: LLM source")


# ------------------------------------------------------------------------------------------- nnUNetv2_train
def trainer_error(run) -> str:
    assert run.returncode == 2, run.output[-3000:]
    assert no_traceback(run.output), run.output[-3000:]
    lines = [line for line in run.output.splitlines() if line.startswith("nnunetv2_llm: error:")]
    assert len(lines) == 1, run.output[-3000:]
    return lines[0]


def test_nnunetv2_train_with_bad_source_or_layer(workdir, tmp_path, single_file_llama):
    trainer = "nnUNetTrainerLLM_1epoch_2iters"
    line = trainer_error(train(trainer, train_env(workdir, tmp_path / "r1", tmp_path / "gone")))
    assert "does not exist" in line and "(fix: nnUNet_LLM_SOURCE)" in line
    line = trainer_error(train(trainer, train_env(workdir, tmp_path / "r2", single_file_llama, layer="7")))
    assert "layer index 7 is out of range" in line and "(fix: nnUNet_LLM_LAYER)" in line


def test_nnunetv2_train_refuses_a_model_folder_of_another_llm(workdir, tmp_path, single_file_llama):
    """A model folder whose plans.json records one LLM, trained on (another fold, or --c) with another."""
    trainer = "nnUNetTrainerLLM_1epoch_2iters"
    env = train_env(workdir, tmp_path / "results", single_file_llama, layer="1")
    model_folder = fold_dir(env, trainer).parent
    model_folder.mkdir(parents=True)
    plans = json.loads((Path(workdir["nnUNet_preprocessed"]) / "Dataset004_Hippocampus" / "nnUNetPlans.json")
                       .read_text())
    make_spec(LLMChoice("pretrained", source=str(single_file_llama), layer=1)).to_plans(plans)
    (model_folder / "plans.json").write_text(json.dumps(plans, default=str))

    narrow = save_tiny_model(tmp_path / "narrow", "llama", hidden_size=32, num_attention_heads=2)
    line = trainer_error(train(trainer, {**env, "nnUNet_LLM_SOURCE": str(narrow)}))
    assert "was trained with an LLM of hidden size 64, the configured one has 32" in line
    assert "(fix: nnUNet_LLM_SOURCE / nnUNet_LLM_LAYER)" in line
    line = trainer_error(train(trainer, {**env, "nnUNet_LLM_LAYER": "2"}))
    assert "trained with another LLM setting" in line and "layer: 1 vs 2" in line


# ------------------------------------------------------------------------------- checkpoints at resume time
def test_checkpoint_of_another_llm_is_refused_at_load(workdir, tmp_path, monkeypatch, capsys, tiny_llama):
    first = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "a", monkeypatch, tiny_llama)
    first.initialize()
    checkpoint = tmp_path / "checkpoint_latest.pth"
    first.save_checkpoint(str(checkpoint))

    other = save_tiny_model(tmp_path / "other", "llama")  # same shapes, other weights (seeded differently below)
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "model.safetensors")
    tensors = {k: (v + 0.01 if ".layers.1." in k else v) for k, v in tensors.items()}
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    second = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "b", monkeypatch, other)
    with pytest.raises(SystemExit) as exit_info:
        second.load_checkpoint(str(checkpoint))
    assert exit_info.value.code == 2
    assert "the frozen LLM layer in" in capsys.readouterr().err

    narrow = save_tiny_model(tmp_path / "narrow", "llama", hidden_size=32, num_attention_heads=2)
    third = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "c", monkeypatch, narrow)
    with pytest.raises(SystemExit) as exit_info:
        third.load_checkpoint(str(checkpoint))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not fit the network" in err and "shapes differ" in err


def test_truncated_checkpoint_falls_back_to_the_next_one(workdir, tmp_path, monkeypatch, capsys, tiny_llama):
    """nnU-Net's own save (torch.save onto the final name) can leave a truncated file; torch.load then fails with
    a zip error. Here the bad file is kept as *.corrupt and the next checkpoint in --c order is used."""
    trainer = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "r", monkeypatch, tiny_llama)
    trainer.initialize()
    folder = Path(trainer.output_folder)
    trainer.save_checkpoint(str(folder / "checkpoint_best.pth"))
    data = (folder / "checkpoint_best.pth").read_bytes()
    (folder / "checkpoint_latest.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(RuntimeError):  # torch's zip reader: 'PytorchStreamReader failed reading zip archive'
        torch.load(folder / "checkpoint_latest.pth", weights_only=False)  # what nnU-Net's load_checkpoint hits

    resumed = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "r", monkeypatch, tiny_llama)
    resumed.load_checkpoint(str(folder / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 1
    assert (folder / "checkpoint_latest.pth.corrupt").is_file() and not (folder / "checkpoint_latest.pth").exists()
    log = Path(resumed.log_file).read_text()
    assert "checkpoint_latest.pth is unreadable" in log and "loaded checkpoint_best.pth" in log

    # a truncated checkpoint_final.pth is set aside, never silently replaced by an unfinished state (--val)
    (folder / "checkpoint_final.pth").write_bytes(data[: len(data) // 2])
    final = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "r", monkeypatch, tiny_llama)
    with pytest.raises(SystemExit) as exit_info:
        final.load_checkpoint(str(folder / "checkpoint_final.pth"))
    assert exit_info.value.code == 2
    assert "again with --c (instead of --val, if you used it): it continues from checkpoint_latest.pth" in \
        capsys.readouterr().err
    assert (folder / "checkpoint_final.pth.corrupt").is_file() and not (folder / "checkpoint_final.pth").exists()

    (folder / "checkpoint_best.pth").write_bytes(b"")
    last = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "r", monkeypatch, tiny_llama)
    with pytest.raises(SystemExit) as exit_info:
        last.load_checkpoint(str(folder / "checkpoint_best.pth"))
    assert exit_info.value.code == 2
    assert "no readable checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- predict


def predict_args(inputs: Path, output: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(inputs), "-o", str(output), "-d", "4", "-c", "3d_fullres", "-f", "0",
            "-tr", "nnUNetTrainerLLM_1epoch_2iters", "-device", "cpu", *extra]


def _rewrite_nifti(path: Path, edit) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    edit(raw)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("damage,expected", [
    ("dim", "broken NIfTI header: dim"),
    ("magic", "magic"),
    ("spacing", "voxel spacing (pixdim)"),
    ("truncated", "truncated or corrupt gzip stream"),
])
def test_predict_refuses_a_broken_image(capsys, tmp_path, image_folder, monkeypatch, damage, expected):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    target = image_folder / "case1_0000.nii.gz"
    if damage == "dim":
        _rewrite_nifti(target, lambda b: b.__setitem__(slice(42, 44), struct.pack("<h", -5)))
    elif damage == "magic":
        _rewrite_nifti(target, lambda b: b.__setitem__(slice(344, 348), b"xxxx"))
    elif damage == "spacing":
        _rewrite_nifti(target, lambda b: b.__setitem__(slice(80, 84), struct.pack("<f", 0.0)))
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # SimpleITK alone reads this without complaint
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out"))
    assert "case1_0000.nii.gz" in line and expected in line and "(fix: -i)" in line


def test_predict_refuses_to_overwrite_predictions(capsys, tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(image_folder / "case0_0000.nii.gz", out / "case0.nii.gz")
    line = cli_error(capsys, *predict_args(image_folder, out))
    assert "already holds 1 prediction(s) (case0.nii.gz)" in line and "--overwrite" in line
    assert "--continue_prediction" in line and "(fix: -o)" in line
    assert "input folder" in cli_error(capsys, *predict_args(image_folder, image_folder))
    # with --overwrite the inputs and output pass, and the next check (no trained model) speaks
    line = cli_error(capsys, *predict_args(image_folder, out, "--overwrite"))
    assert "no trained dataset 4" in line and "(fix: -d)" in line


def test_predict_checks_the_model_folder(capsys, tmp_path, image_folder, monkeypatch, tiny_llama):
    results = tmp_path / "results"
    model = results / "Dataset004_Hippocampus" / "nnUNetTrainerLLM_1epoch_2iters__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(results))
    plans = {"plans_name": "nnUNetPlans"}
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1))
    spec.to_plans(plans)
    (model / "plans.json").write_text(json.dumps(plans, default=str))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}))
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out"))
    assert "fold 0 has no checkpoint_final.pth" in line and "(fix: -f / -chk)" in line

    # a checkpoint whose bottleneck is 32 wide, under plans that describe a 64-wide LLM
    torch.save({"network_weights": {"bottleneck.proj_in.up.weight": torch.zeros(32, 4)}},
               model / "fold_0" / "checkpoint_final.pth")
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out"))
    assert "hidden size 32" in line and "hidden size 64" in line

    # and a two-channel model gets one-channel cases
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                    "file_ending": ".nii.gz"}))
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out"))
    assert "has channels [0], the model expects [0, 1]" in line


def test_plans_block_written_by_to_plans_reads_back(tiny_llama):
    plans: dict = {}
    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1))
    spec.to_plans(plans)
    again = json.loads(json.dumps(plans, default=str))[PLANS_KEY]
    from nnunetv2_llm.model.spec import BottleneckSpec

    assert BottleneckSpec(**again).differences(spec) == []  # JSON round trip (int dict keys) is not a change


@pytest.mark.parametrize("extra,expected", [
    (["-step_size", "0"], "-step_size 0.0 must be in (0, 1]"),
    (["-num_parts", "2", "-part_id", "2"], "-part_id 2 must be in 0 .. num_parts-1"),
    (["-prev_stage_predictions", "no_such_folder"],
     "previous-stage predictions folder 'no_such_folder' does not exist"),
])
def test_predict_checks_nnunet_run_options_first(capsys, tmp_path, image_folder, monkeypatch, extra, expected):
    """nnUNetv2_predict's sliding-window, parts and cascade options are taken (not misparsed) and checked."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    line = cli_error(capsys, *predict_args(image_folder, tmp_path / "out", *extra))
    assert expected in line
