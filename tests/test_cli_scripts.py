"""The scripts: ``install.sh`` installs once and leaves the venv's ``activate`` alone (``nnunetv2_llm info
--exports`` sets the shell up); ``benchmark_layer_loading.py`` refuses bad options in one line naming its own
options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_llm.common.environment import TRAINER_LOOKUP_DIR
from nnunetv2_llm.llm import synthetic as synthetic_llm

REPO = Path(__file__).resolve().parents[1]
LAYER_LOADING = REPO / "scripts" / "benchmark_layer_loading.py"
FAKE_COMMAND = '#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"\n'
PIP_INSTALL = "python -m pip install -q -e .[test]"


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    """install.sh and the build files in a folder whose .venv logs every python / nnunetv2_llm call instead of
    running it."""
    root = tmp_path / "checkout with space"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", root / "scripts")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(REPO / name, root)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").write_text("# venv's own activate script\n")
    for name in ("python", "nnunetv2_llm"):
        (root / ".venv" / "bin" / name).write_text(FAKE_COMMAND)
        (root / ".venv" / "bin" / name).chmod(0o755)
    return root


def install(root: Path) -> tuple[str, list[str]]:
    """Run install.sh; its output and the commands it ran in the venv since the last call."""
    log = root / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(root / "scripts" / "install.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("changed", ["pyproject.toml", "setup.py", "scripts/install.sh"])
def test_install_runs_pip_once_until_a_build_file_changes(fake_checkout, changed):
    out, calls = install(fake_checkout)
    assert PIP_INSTALL in calls and "nnunetv2_llm info --exports" in calls
    assert not any("--upgrade pip" in c for c in calls)  # this pip is new enough
    assert 'eval "$(nnunetv2_llm info --exports)"' in out
    out, calls = install(fake_checkout)
    assert calls == [] and out.startswith("already installed")
    with (fake_checkout / changed).open("a") as f:
        f.write("# changed\n")
    _, calls = install(fake_checkout)
    assert PIP_INSTALL in calls
    assert (fake_checkout / ".venv" / "bin" / "activate").read_text() == "# venv's own activate script\n"


def test_the_exports_let_a_shell_find_the_trainers_and_keep_what_is_set():
    """What the README tells a shell to run: nnUNet_extTrainer gets the package's lookup folder (added once to a
    value already set), OMP_WAIT_POLICY defaults to PASSIVE."""
    exports = f'eval "$({sys.executable} -m nnunetv2_llm.cli info --exports)"'
    script = (f'unset nnUNet_extTrainer OMP_WAIT_POLICY; {exports}; echo "$nnUNet_extTrainer|$OMP_WAIT_POLICY";'
              f' export nnUNet_extTrainer=/mine OMP_WAIT_POLICY=ACTIVE; {exports}; {exports};'
              ' echo "$nnUNet_extTrainer|$OMP_WAIT_POLICY"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.splitlines() == [f"{TRAINER_LOOKUP_DIR}|PASSIVE", f"/mine:{TRAINER_LOOKUP_DIR}|ACTIVE"], \
        proc.stderr
    assert (TRAINER_LOOKUP_DIR / "nnunetv2_llm_trainers.py").is_file()


def layer_loading(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "nnUNet_LLM_SYNTHETIC_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(LAYER_LOADING), "--output", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_layer_loading_script_refuses_bad_options_in_one_line(tmp_path):
    proc = layer_loading("--preset", "foo", tmp_path=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'foo'" in proc.stderr and "Traceback" not in proc.stderr
    proc = layer_loading("--preset", "tiny-llama", "--layer-index", "9", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "benchmark_layer_loading.py: error: layer index 9 is out of range: the checkpoint gets --layers 4 layers "
        "(0..3) (fix: --layer-index / --layers)"]
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    folder = synthetic_llm.write_synthetic_checkpoint(tmp_path / "two_layers", "tiny-llama")
    proc = layer_loading("--folder", str(folder), "--layer-index", "5", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "benchmark_layer_loading.py: error: layer index 5 is out of range: the model has 2 layers (0..1) "
        "(fix: --layer-index)"]
