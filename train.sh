#!/usr/bin/env bash
# Train DualTowerVLM (or the single-tower vanilla baseline): a thin wrapper over train/main.py, launched with
# torchrun, one process per visible GPU, or as one plain process when no GPU is visible.
#
#   bash train.sh                                       # the debug recipe on the CPU (about 7 minutes, 2 cores)
#   bash train.sh vanilla_debug                         # a recipe by name (train/configs/<name>.toml) or by path
#   RECIPE=cauldron_135m bash train.sh --training.steps=1000   # other arguments: overrides for train/main.py
#   CUDA_VISIBLE_DEVICES=0,1 bash train.sh cauldron_135m       # two processes, one per visible GPU
#
# Environment:
#   RECIPE          recipe when the first argument is not one (default: debug)
#   NPROC           processes (default: the number of visible GPUs; one plain process without a GPU)
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--nnodes 2 --node_rank 0 --rdzv_endpoint host:29500"
#   LOG_DIR         where the log goes (default: logs): LOG_DIR/train_<recipe>_<timestamp>.log
#   PYTHON          the interpreter (default: python)
#   DRY_RUN=1       print the command and exit
# Read by the trainer, passed through untouched: WANDB_API_KEY, WANDB_MODE, WANDB_ENTITY, HF_TOKEN (HF_API_KEY,
# the original's other name for it, fills HF_TOKEN when that is unset), HF_HOME, CUDA_VISIBLE_DEVICES.
# (The original train.sh also trained the vanilla model after the dual tower; here that is its own recipe.)
set -euo pipefail

CALLER_DIR="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"  # as the original: the recipes' run_dir, LOG_DIR and relative override paths start here
PYTHON="${PYTHON:-python}"

recipe="${RECIPE:-debug}"
if [[ $# -gt 0 && "$1" != --* ]]; then
    recipe="$1"
    shift
fi
if [[ "$recipe" == *.toml || "$recipe" == */* ]]; then
    config="$recipe"
    if [[ "$config" != /* && -f "$CALLER_DIR/$config" ]]; then
        config="$CALLER_DIR/$config"  # a recipe file given relative to where train.sh was called from
    fi
else
    config="train/configs/$recipe.toml"
fi
if [[ ! -f "$config" ]]; then
    known="$(cd train/configs && ls -- *.toml | sed 's/\.toml$//' | tr '\n' ' ')"
    echo "error: recipe not found: $config (known recipes: $known)" >&2
    exit 2
fi
name="$(basename "$config" .toml)"

if [[ -z "${HF_TOKEN:-}" && -n "${HF_API_KEY:-}" ]]; then
    export HF_TOKEN="$HF_API_KEY"
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# GPUs this process may use: nvidia-smi's count, narrowed by CUDA_VISIBLE_DEVICES ("" or -1 hides them all;
# CUDA stops at the first invalid entry).
visible_gpus() {
    local physical
    physical="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    physical="${physical:-0}"
    if [[ "$physical" -eq 0 || -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        echo "$physical"
        return
    fi
    local count=0 entry
    IFS=',' read -ra entries <<< "${CUDA_VISIBLE_DEVICES// /}"
    for entry in "${entries[@]}"; do
        [[ -z "$entry" || "$entry" == -* ]] && break
        count=$((count + 1))
    done
    echo $((count < physical ? count : physical))
}

gpus="$(visible_gpus)"
nproc="${NPROC:-$gpus}"
if [[ "$nproc" -ge 1 ]]; then
    # shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of flags on purpose
    launcher=("$PYTHON" -m torch.distributed.run ${TORCHRUN_ARGS:---standalone} --nproc_per_node "$nproc")
else
    launcher=("$PYTHON")
fi
command=("${launcher[@]}" train/main.py --config "$config" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

LOG_DIR="${LOG_DIR:-logs}"
mkdir -p "$LOG_DIR"
log="$LOG_DIR/train_${name}_$(date +%Y%m%d_%H%M%S).log"
echo "train.sh: recipe $name, $gpus visible GPU(s), log $log" >&2
"${command[@]}" 2>&1 | tee "$log"
