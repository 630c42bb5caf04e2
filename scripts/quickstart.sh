#!/usr/bin/env bash
# One command: install everything, then run the main job on the embedded default (real MSD Hippocampus
# subset, real SmolLM2-135M layer): plan, train a short CPU budget, predict the unlabelled scan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/nnunetv2_llm demo --work-dir "${1:-nnunetv2_llm_demo}"
