"""The scripts: ``install.sh`` installs once and hooks ``activate`` without running Python there;
``benchmark_layer_loading.py`` refuses bad options in one line naming its own options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_llm.llm import synthetic as synthetic_llm

REPO = Path(__file__).resolve().parents[1]
LAYER_LOADING = REPO / "scripts" / "benchmark_layer_loading.py"
FAKE_COMMAND = '#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"\n'


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    """install.sh and setup.py in a folder whose .venv logs every python / nnunetv2_llm call instead of running it."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.is_file():
        pytest.skip("tests not run from a venv: no activate script to start from")
    root = tmp_path / "checkout with space"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", root / "scripts")
    shutil.copy(REPO / "setup.py", root)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").write_text(activate.read_text().replace(sys.prefix, str(root / ".venv")))
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


def test_install_runs_pip_once_until_setup_py_changes(fake_checkout):
    _, calls = install(fake_checkout)
    assert "python -m pip install -q -e .[test]" in calls
    assert not any("--upgrade pip" in c for c in calls)  # this pip is new enough
    out, calls = install(fake_checkout)
    assert calls == [] and out.startswith("already installed")
    with (fake_checkout / "setup.py").open("a") as f:
        f.write("# changed\n")
    _, calls = install(fake_checkout)
    assert "python -m pip install -q -e .[test]" in calls
    assert (fake_checkout / ".venv" / "bin" / "activate").read_text().count(">>> nnunetv2_llm") == 2  # not repeated


def test_activate_sets_the_variables_without_python_and_deactivate_restores_them(fake_checkout):
    install(fake_checkout)
    (fake_checkout / ".venv" / "calls.log").unlink()
    trainers = fake_checkout / "trainers"
    script = ('unset nnUNet_extTrainer OMP_WAIT_POLICY; source .venv/bin/activate; echo "$nnUNet_extTrainer|$OMP_WAIT_POLICY";'
              ' deactivate; echo "${nnUNet_extTrainer-unset}|${OMP_WAIT_POLICY-unset}";'
              ' export nnUNet_extTrainer=/mine OMP_WAIT_POLICY=ACTIVE; source .venv/bin/activate;'
              ' source .venv/bin/activate; echo "$nnUNet_extTrainer|$OMP_WAIT_POLICY";'
              ' deactivate; echo "$nnUNet_extTrainer|$OMP_WAIT_POLICY"')
    proc = subprocess.run(["bash", "-c", script], cwd=fake_checkout, capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == [f"{trainers}|PASSIVE", "unset|unset", f"/mine:{trainers}|ACTIVE",
                                        "/mine|ACTIVE"], proc.stderr
    assert not (fake_checkout / ".venv" / "calls.log").exists()  # no Python at activation


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
