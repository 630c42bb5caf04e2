"""No code from a model folder or a weights file ever runs: no trust_remote_code, no unpickling of LLM weights
unless opted in (and then tensors only), checkpoints read with weights_only=True."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from reliability_helpers import make_trainer

from nnunetv2_llm import cli
from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.model.spec import LLMChoice, make_spec
from nnunetv2_llm.trainers.reliability.checkpoint_io import CheckpointUnreadable, load_checkpoint_file

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_llm"


@pytest.fixture(autouse=True)
def clean_llm_env(monkeypatch):
    for name in ("nnUNet_LLM_SOURCE", "nnUNet_LLM_LAYER", "nnUNet_LLM_ALLOW_PICKLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


class CreatesFile:
    """Unpickling this calls ``open(path, 'w')``: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


CUSTOM_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('custom code ran')\n"


def test_package_never_asks_for_remote_code():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    assert sources
    for path, text in sources.items():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
    # only the checkpoint reader unpickles fully, and only on the documented opt-in
    checkpoint_io = PACKAGE / "trainers" / "reliability" / "checkpoint_io.py"
    assert [p for p, text in sources.items() if "weights_only=False" in text] == [checkpoint_io]
    assert "if not pickle_allowed():" in sources[checkpoint_io]


def test_model_folder_with_custom_code_loads_without_running_it(llama, tmp_path, capsys):
    folder = shutil.copytree(llama, tmp_path / "custom")
    marker = tmp_path / "ran.txt"
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModel": "modeling_custom.CustomModel",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))

    assert cli.main(["info", "--llm-source", str(folder), "--llm-layer", "1"]) == 0
    spec = make_spec(LLMChoice("pretrained", source=str(folder), layer=1))
    from nnunetv2_llm.model.network import build_mixer

    build_mixer(spec)
    assert "auto_map" not in spec.llm_config
    assert spec.layer_sha256 == make_spec(LLMChoice("pretrained", source=str(llama), layer=1)).layer_sha256
    assert not marker.exists()


def test_custom_model_type_is_refused(llama, tmp_path, capsys):
    folder = shutil.copytree(llama, tmp_path / "custom_type")
    marker = tmp_path / "ran.txt"
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoConfig": "modeling_custom.Config",
                                                        "AutoModel": "modeling_custom.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["info", "--llm-source", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "model type 'my_custom_llm'" in err and "never runs" in err and "trust_remote_code" in err
    assert not marker.exists()


def pickled_copy(llama: Path, folder: Path) -> Path:
    """The same model with pytorch_model.bin instead of model.safetensors."""
    from safetensors.torch import load_file

    folder.mkdir()
    shutil.copy(llama / "config.json", folder / "config.json")
    torch.save(load_file(llama / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_unless_opted_in(llama, tmp_path, capsys, monkeypatch):
    folder = pickled_copy(llama, tmp_path / "pickled")
    assert cli.main(["info", "--llm-source", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "refused" in err and "nnUNet_LLM_ALLOW_PICKLE=1" in err
    assert cli.main(["info", "--llm-source", str(folder / "pytorch_model.bin")]) == 2
    assert "pickled checkpoint" in capsys.readouterr().err

    monkeypatch.setenv("nnUNet_LLM_ALLOW_PICKLE", "1")
    spec = make_spec(LLMChoice("pretrained", source=str(folder), layer=1))
    assert spec.source_format == "pickle"
    assert spec.layer_sha256 == make_spec(LLMChoice("pretrained", source=str(llama), layer=1)).layer_sha256


def test_opted_in_pickle_still_runs_no_code(llama, tmp_path, monkeypatch):
    folder = pickled_copy(llama, tmp_path / "evil")
    marker = tmp_path / "ran.txt"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["payload"] = CreatesFile(marker)
    torch.save(state, folder / "pytorch_model.bin")
    monkeypatch.setenv("nnUNet_LLM_ALLOW_PICKLE", "1")
    with pytest.raises(LLMSettingError, match="weights_only=True"):
        make_spec(LLMChoice("pretrained", source=str(folder), layer=1))
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # control: the file really runs code
    assert marker.exists()


def test_tampered_checkpoint_is_refused(workdir, tmp_path, monkeypatch, capsys, llama):
    """A checkpoint in the results folder that would run code when unpickled: refused by the trainer (--c) and
    by ``nnunetv2_llm predict``, unless the user sets nnUNet_LLM_ALLOW_PICKLE=1 for a file they trust."""
    trainer = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "results", monkeypatch, llama)
    trainer.initialize()
    folder = Path(trainer.output_folder)
    trainer.save_checkpoint(str(folder / "checkpoint_latest.pth"))
    clean = load_checkpoint_file(folder / "checkpoint_latest.pth")  # nnU-Net's own checkpoints load safely
    marker = tmp_path / "ran.txt"
    torch.save({**clean, "payload": CreatesFile(marker)}, folder / "checkpoint_latest.pth")

    with pytest.raises(CheckpointUnreadable) as info:
        load_checkpoint_file(folder / "checkpoint_latest.pth")
    assert info.value.security and "nnUNet_LLM_ALLOW_PICKLE=1" in info.value.reason
    resumed = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "results", monkeypatch, llama)
    with pytest.raises(SystemExit) as exit_info:
        resumed.load_checkpoint(str(folder / "checkpoint_latest.pth"))
    assert exit_info.value.code == 2 and "refusing checkpoint" in capsys.readouterr().err
    assert (folder / "checkpoint_latest.pth").is_file()  # kept as it is, not renamed as corrupt

    images = tmp_path / "images"
    images.mkdir()
    from nnunetv2_llm.common.nnunet_commands import FIXTURE

    shutil.copy(next((FIXTURE / "imagesTr").glob("*.nii.gz")), images / "case_0000.nii.gz")
    shutil.copy(folder / "checkpoint_latest.pth", folder / "checkpoint_final.pth")
    (folder.parent / "plans.json").write_text(json.dumps(trainer.plans_manager.plans, default=str))
    (folder.parent / "dataset.json").write_text(json.dumps(trainer.dataset_json))
    code = cli.main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-d", "4", "-c", "3d_fullres",
                     "-f", "0", "-tr", "nnUNetTrainerLLM_1epoch_2iters", "-device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "holds pickled objects" in err and "(fix: nnUNet_LLM_ALLOW_PICKLE)" in err
    assert not marker.exists()

