#!/usr/bin/env bash
# The checks a session with a lent H100/H200 runs, in under 9 minutes, results under one folder (default
# gpu_check_results/, or --out DIR):
#   1. the full MSD Hippocampus (Task04) converted to nnU-Net's raw format, planned and preprocessed (3d_fullres);
#   2. `nnunetv2_llm benchmark --device cuda` with an 8B-shaped layer (synthetic:llama-8b), eager, then --compile;
#   3. a head-to-head of nnUNetTrainer, nnUNetTrainerLLM, its NoLLM and Random controls at a short GPU budget
#      (_20epochs_50iters) on --folds (default 0), --jobs trainings sharing GPU 0 at once, then compare.
# Each step has its own time limit (the whole stays under 9 minutes) and its log under OUT/logs; a step that runs out
# of time is recorded and the next one starts (head-to-head resumes where it stopped when run again).
# --dry-run prints the steps and commands without running anything.
# Usage: scripts/gpu_check.sh [--dry-run] [--out DIR] [--folds "0 1"] [--jobs N] [--data TASK04_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=gpu_check_results
FOLDS="0"
JOBS=4
DATA=${HIPPOCAMPUS:-/work/shared/datasets/Task04_Hippocampus}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=$2; shift ;;
    --folds) FOLDS=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --data) DATA=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done

BIN=$( [ -x .venv/bin/nnunetv2_llm ] && echo .venv/bin/ || echo "" )
OUT=$(realpath -m "$OUT")
BUDGET=_20epochs_50iters
TRAINERS="nnUNetTrainer$BUDGET nnUNetTrainerLLM$BUDGET nnUNetTrainerLLMNoLLM$BUDGET nnUNetTrainerLLMRandom$BUDGET"
export nnUNet_raw=$OUT/nnunet/nnUNet_raw nnUNet_preprocessed=$OUT/nnunet/nnUNet_preprocessed
export nnUNet_results=$OUT/nnunet/nnUNet_results
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-3}  # --jobs trainings share 16 cores for their augmentation
export nnUNet_LLM_SYNTHETIC_CACHE=$OUT/synthetic_llm

# step NAME SECONDS COMMAND...: print it; unless --dry-run, run it under `timeout`, log to OUT/logs/NAME.log and
# record "NAME exit-code seconds" in OUT/steps.tsv (124: ran out of time).
step() {
  local name=$1 limit=$2
  shift 2
  echo "[$name, at most ${limit} s] $*"
  [ "$DRY_RUN" = 1 ] && return 0
  local start=$SECONDS code=0
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || code=$?
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" | tee -a "$OUT/steps.tsv"
}

if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT/logs" "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
fi
echo "results: $OUT"
step convert 45 "${BIN}nnUNetv2_convert_MSD_dataset" -i "$DATA" -overwrite_id 4 -np 8
step preprocess 75 "${BIN}nnUNetv2_plan_and_preprocess" -d 4 -c 3d_fullres --verify_dataset_integrity -np 8
step benchmark_eager 60 "${BIN}nnunetv2_llm" benchmark -d 4 --device cuda --llm-source synthetic:llama-8b \
  --iterations 20 --warmup 5 --output "$OUT/benchmark_eager"
step benchmark_compile 100 "${BIN}nnunetv2_llm" benchmark -d 4 --device cuda --llm-source synthetic:llama-8b \
  --iterations 20 --warmup 5 --compile --output "$OUT/benchmark_compile"
# Trainings without torch.compile: its minute of compiling per training does not fit this budget.
# shellcheck disable=SC2086  # TRAINERS and FOLDS are lists
step head_to_head 240 env nnUNet_compile=false "${BIN}nnunetv2_llm" head-to-head -d 4 -c 3d_fullres -tr $TRAINERS -f $FOLDS \
  --device cuda --jobs "$JOBS" --gpus 0 -o "$OUT/head_to_head" --overwrite
echo "done: $OUT (steps.tsv: name, exit code, seconds; logs/; benchmark_*/benchmark.md; head_to_head/report.md)"
