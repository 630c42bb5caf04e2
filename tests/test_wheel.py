"""The package installed from a wheel (not editable, no source checkout): nnU-Net's trainer lookup finds
``nnUNetTrainerLLM`` through the folder ``nnunetv2_llm info --exports`` points ``nnUNet_extTrainer`` at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOOKUP_MODULE = "nnunetv2_llm/trainers/lookup/nnunetv2_llm_trainers.py"
FIND_TRAINER = """
import inspect, os
import nnunetv2_llm
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

found = recursive_find_trainer_class_by_name("nnUNetTrainerLLM")
print("EXT_TRAINER", os.environ["nnUNet_extTrainer"])
print("PACKAGE", nnunetv2_llm.__file__)
print("FOUND", found.__name__, inspect.getfile(found))
"""


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the build inputs (the shared checkout gets no build/ folder), installed with
    ``pip install --target``: the folder to put on PYTHONPATH."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO / "nnunetv2_llm", source / "nnunetv2_llm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), ".", cwd=source)
    wheel = next((work / "dist").glob("nnunetv2_llm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert LOOKUP_MODULE in names, "the trainer lookup folder is not in the wheel"
    assert not any(name.startswith("trainers/") for name in names)  # the checkout's folder stays out
    pip("install", "--no-deps", "-q", "--target", str(work / "site"), str(wheel), cwd=work)
    return work / "site"


def test_nnunet_finds_the_trainer_of_an_installed_wheel_through_the_exports(installed_wheel, tmp_path):
    # Only the wheel's folder on PYTHONPATH (never the venv's site-packages: FINDINGS.md), run outside the checkout.
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["PYTHONPATH"] = str(installed_wheel)
    script = (f'eval "$("{sys.executable}" -m nnunetv2_llm.cli info --exports)" && '
              f'"{sys.executable}" -c \'{FIND_TRAINER}\'')
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    lookup = installed_wheel / "nnunetv2_llm" / "trainers" / "lookup"
    assert lines["EXT_TRAINER"] == str(lookup)
    assert Path(lines["PACKAGE"]).is_relative_to(installed_wheel)
    name, where = lines["FOUND"].split(" ", 1)
    assert name == "nnUNetTrainerLLM" and Path(where).is_relative_to(installed_wheel)
