"""Shared fixtures: tiny random LLM folders, and a real nnU-Net work dir built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nnunetv2_llm.common.nnunet_commands import FIXTURE, demo_env, ensure_preprocessed, ensure_raw_from_msd

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def nnunet_workdir(tmp_path_factory) -> dict[str, str]:
    """Env for nnU-Net's commands: dataset 4 converted from the embedded Hippocampus subset (12 real cases,
    one unlabelled test scan) and preprocessed for 3d_fullres and 2d, plus the trainers folder."""
    work = tmp_path_factory.mktemp("nnunet")
    env = demo_env(work)
    env["nnUNet_n_proc_DA"] = "1"
    ensure_raw_from_msd(FIXTURE, 4, env)
    ensure_preprocessed(4, "3d_fullres", env)
    ensure_preprocessed(4, "2d", env)
    return env


def save_tiny_model(folder: Path, model_type: str = "llama", shard_size: str | None = None, **overrides) -> Path:
    """A tiny randomly initialised model of ``model_type``, saved as safetensors (sharded if shard_size)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=97, max_position_embeddings=512)
    if model_type == "bert":
        base.pop("num_key_value_heads")
    if model_type == "gemma":
        base["head_dim"] = 16
    base.update(overrides)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **base)
    model = (AutoModel if model_type == "bert" else AutoModelForCausalLM).from_config(config)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def save_bfloat16_model(folder: Path) -> Path:
    """A tiny Llama saved with bfloat16 tensors (one safetensors file)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model(folder, "llama", torch_dtype="bfloat16")
    model_file = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(model_file).items()}, str(model_file))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 3-layer Llama with hidden size 64, saved in several safetensors shards with an index json."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", shard_size="100KB")


@pytest.fixture(scope="session")
def workdir(request) -> dict[str, str]:
    """The session's nnU-Net work dir (conftest's ``nnunet_workdir``). For quick local iterations,
    ``NNUNETV2_LLM_TEST_WORKDIR=/path`` points to one already converted and preprocessed (3d_fullres)."""
    prebuilt = os.environ.get("NNUNETV2_LLM_TEST_WORKDIR")
    if prebuilt:
        from nnunetv2_llm.common.nnunet_commands import demo_env

        return demo_env(Path(prebuilt))
    return request.getfixturevalue("nnunet_workdir")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, src in enumerate(sorted((FIXTURE / "imagesTr").glob("*.nii.gz"))[:2]):
        shutil.copy(src, folder / f"case{i}_0000.nii.gz")
    return folder


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch) -> Path:
    """Empty nnU-Net data folders in the environment, and no LLM setting from the shell."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    for name in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def three_layer_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
