#!/usr/bin/env bash
# Evaluate a DualTowerVLM checkpoint with lmms-eval (MMStar by default).
#   CHECKPOINT=dir_or_repo TASKS=mmstar,ai2d BATCH_SIZE=32 ./evaluate.sh [more dualtower.evaluate flags]
# Other overrides: DEVICE (default: cuda when available), OUTPUT_PATH (eval_results), PYTHON (python).
set -euo pipefail

CHECKPOINT="${CHECKPOINT:-patrickamadeus/dualtower-cauldron}"
TASKS="${TASKS:-mmstar}"
BATCH_SIZE="${BATCH_SIZE:-32}"
OUTPUT_PATH="${OUTPUT_PATH:-eval_results}"
PYTHON="${PYTHON:-python}"
export TOKENIZERS_PARALLELISM=false

args=(--model "$CHECKPOINT" --tasks "$TASKS" --batch_size "$BATCH_SIZE" --output_path "$OUTPUT_PATH" --process_with_media)
if [[ -n "${DEVICE:-}" ]]; then
    args+=(--device "$DEVICE")
fi
exec "$PYTHON" -m dualtower.evaluate "${args[@]}" "$@"
