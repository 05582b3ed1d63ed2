#!/usr/bin/env bash
# GPU check: the `gpu` tests and the GPU benchmarks in under 8 minutes, then one summary table.
# Usage (on the GPU machine, from the repository root): bash scripts/gpu_check.sh [OUT_DIR]
# Installs nothing that resolves dependencies: the GPU machine already has torch, triton and transformers.
set -uo pipefail
out_dir=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out_dir"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pip install -q --no-deps --no-build-isolation -e . >"$out_dir/install.log" 2>&1 \
    || echo "editable install failed (see install.log); using PYTHONPATH" >&2
# kernels/ installs as dualtower_kernels; without the install, expose it through a link.
python -c "import dualtower_kernels" 2>/dev/null || { mkdir -p "$out_dir/shim" && ln -sfn "$PWD/kernels" "$out_dir/shim/dualtower_kernels"; export PYTHONPATH="$out_dir/shim:$PYTHONPATH"; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$out_dir/versions.txt"

timeout 210 python -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$out_dir/gpu_tests.xml" \
    >"$out_dir/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -n 1 "$out_dir/gpu_tests.log"))"

timeout 240 python -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$out_dir/benchmarks.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=1 >"$out_dir/benchmarks.log" 2>&1
echo "benchmarks: exit $? ($(tail -n 1 "$out_dir/benchmarks.log"))"

python scripts/summarize_benchmarks.py "$out_dir/benchmarks.json" | tee "$out_dir/summary.md"
