#!/usr/bin/env bash
# GPU check: the `gpu` tests and the GPU benchmarks in under 8 minutes, then one summary table.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run        print the stages, their time limits and commands; run nothing
#   bash scripts/gpu_check.sh --prepare        on a CPU machine with the tokenizer: save it to runs/gpu_assets/;
#                                              with GPU_CHECK_TORCH_PYTHON (a Python whose torch is the GPU
#                                              machine's CUDA build, e.g. a venv with torch==2.11.0 from PyPI)
#                                              and nvcc, also build the fused sampler there for sm_90
#
# OUT_DIR defaults to $OUT, else ./gpu_check_out. It receives versions.txt, one <stage>.log per stage, one
# pytest-benchmark <stage>.json per finished benchmark stage, results.jsonl (one line per finished benchmark,
# written as each one ends, so a stage cut by its limit keeps what it measured), profile/ (torch profiler traces)
# and summary.md (also printed).
#
# Install: `pip install --no-deps --no-build-isolation -e .` (the GPU machine already has torch, triton and
# transformers; nothing is resolved or downloaded); if that fails, PYTHONPATH plus a dualtower_kernels link.
# Without a CUDA device the script prints "no CUDA device" and exits 3 before running anything: the CPU suite is
# `pytest tests` and `pytest benchmarks`.
#
# Stages run in priority order, each under its own limit and never past the total budget GPU_CHECK_BUDGET_S
# (default 460 s from the script's start; with a stage's 15 s kill grace and the summary it ends before 8
# minutes); a stage with under 20 s left is skipped and says so:
#   install 60 s | gpu tests 150 s | train (eager cases) 90 s | train (compiled dualtower) 180 s | decode 100 s |
#   kernels (eager baselines) 90 s | other bench files (data, vanilla vs dual) 60 s | 360m recipe profile: the
#   rest | the kernels' compiled baselines: the rest
# (--dry-run shows the nominal limits; a real run shrinks each to the time left). On an H200 (2026-11-27) the
# first six took 2, 120+ (cut), 81, 150+ (cut, with the original's whole-model compile, now `slow`), 89 and 54 s:
# they do not all fit in one 8-minute run. GPU_CHECK_STAGES=a,b,... runs only the named stages (install
# always), so a second run can measure what the first did not reach.
# The data benchmark and the recipe profile need the tokenizer, which the GPU machine cannot download: run
# `--prepare` on a CPU machine first and carry runs/gpu_assets to the GPU machine (it is git-ignored), or point
# DUALTOWER_TOKENIZER_DIR at a saved tokenizer. Without it those two are skipped, saying why. A prebuilt sampler
# in runs/gpu_assets/csrc spares the gpu tests a minute of nvcc, and lets them run where nvcc is missing.
# Exit status: 0 when every stage that ran passed; 1 when any failed or timed out (the summary names them); 2
# before anything runs when GPU_CHECK_STAGES names an unknown stage; 3 without a CUDA device. OUT_DIR's stage JSONs from an earlier run are removed first.
# For testing the script itself: GPU_CHECK_INSTALL=0 skips the install, GPU_CHECK_ALLOW_CPU=1 runs the stages on
# a CPU (CPU figures; the GPU-only cases skip).
set -uo pipefail

mode=run
case "${1:-}" in
    --dry-run) mode=dry; shift ;;
    --prepare) mode=prepare; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
esac
out_dir=${1:-${OUT:-gpu_check_out}}
budget=${GPU_CHECK_BUDGET_S:-460}
reserve=20  # seconds kept for the summary
tokenizer_dir=${DUALTOWER_TOKENIZER_DIR:-runs/gpu_assets/tokenizer}
sampler_library=runs/gpu_assets/csrc/dualtower_csrc_sampling.so
failed=()
statuses=()  # one line per stage, repeated in summary.md
stages=(install gpu_tests train train_compiled decode kernels other_benchmarks profile_360m compiled)
bench_stages=(train decode kernels train_compiled other_benchmarks compiled)  # the summary's order

# A misspelt stage would select nothing and pass: on a GPU machine's short lease, a lost run.
IFS=, read -ra chosen <<<"${GPU_CHECK_STAGES:-}"
for stage in "${chosen[@]}"; do
    if [[ -n $stage && " ${stages[*]} " != *" $stage "* ]]; then
        echo "GPU_CHECK_STAGES: unknown stage '$stage' (stages: ${stages[*]})" >&2
        exit 2
    fi
done

if [[ $mode == prepare ]]; then
    python - "$tokenizer_dir" <<'EOF' || exit 1
import sys
from dualtower.tokenizer import load_tokenizer
load_tokenizer().save_pretrained(sys.argv[1])
print(f"tokenizer saved to {sys.argv[1]}; carry runs/gpu_assets to the GPU machine")
EOF
    if [[ -n ${GPU_CHECK_TORCH_PYTHON:-} ]]; then
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$GPU_CHECK_TORCH_PYTHON" -m dualtower.generation.csrc_sampler \
            build "$(dirname "$sampler_library")" || exit 1
    fi
    exit 0
fi

shell_words() {  # the arguments as one command line that a shell reads back as the same arguments
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
            words+=("$arg")
        else
            words+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    echo "${words[*]}"
}

run_stage() {  # run_stage NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), logs to NAME.log
    local name=$1 limit=$2
    shift 2
    if [[ -n ${GPU_CHECK_STAGES:-} && $name != install && ",$GPU_CHECK_STAGES," != *",$name,"* ]]; then
        [[ $mode == run ]] && statuses+=("$name: not selected (GPU_CHECK_STAGES)")
        return 0
    fi
    local left=$((budget - SECONDS - reserve))
    ((limit > left)) && limit=$left
    if [[ $mode == dry ]]; then
        printf '%-16s <= %3s s  %s\n' "$name" "$limit" "$(shell_words "$@")"
        return 0
    fi
    if ((limit < 20)); then
        statuses+=("$name: skipped (the ${budget} s budget is spent)")
        echo "${statuses[-1]}"
        return 0
    fi
    local start=$SECONDS rc
    timeout -s INT -k 15 "$limit" "$@" >"$out_dir/$name.log" 2>&1
    rc=$?
    local status="exit $rc"
    ((rc == 124 || rc == 137)) && status="TIMED OUT after ${limit} s"
    ((rc != 0)) && failed+=("$name")
    statuses+=("$name: $status in $((SECONDS - start)) s ($(tail -n 1 "$out_dir/$name.log"))")
    echo "${statuses[-1]}"
}

bench_stage() {  # bench_stage NAME LIMIT_S PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    run_stage "$name" "$limit" python -m pytest "$@" -q -p no:cacheprovider --benchmark-json="$out_dir/$name.json"
}

if [[ $mode == run ]]; then
    if [[ ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]] &&
        ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA device: scripts/gpu_check.sh runs only on a GPU machine (on a CPU: pytest tests; pytest benchmarks)" >&2
        exit 3
    fi
    mkdir -p "$out_dir/profile"
    unset TRITON_INTERPRET
    export DUALTOWER_BENCH_LOG="$out_dir/results.jsonl" DUALTOWER_BENCH_PROFILE_DIR="$out_dir/profile"
    # No network on the GPU machine: the Hub client must not probe it (a DNS lookup and a timeout per load).
    export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    : >"$DUALTOWER_BENCH_LOG"
    # This run's results only: an earlier run's stage JSON (a stage skipped, not selected, or cut before pytest
    # wrote its own) would be summarized as this run's figures.
    for stage in "${bench_stages[@]}"; do rm -f "$out_dir/$stage.json"; done
fi
[[ ${GPU_CHECK_INSTALL:-1} == 1 ]] && run_stage install 60 python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [[ $mode == run ]]; then
    if ! python -c "import dualtower, dualtower_kernels" 2>/dev/null; then
        echo "editable install unusable: using PYTHONPATH" >&2
        mkdir -p "$out_dir/shim" && ln -sfn "$PWD/kernels" "$out_dir/shim/dualtower_kernels"
        export PYTHONPATH="$PWD:$out_dir/shim${PYTHONPATH:+:$PYTHONPATH}"
    fi
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
        python -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'cuda',
            torch.version.cuda, 'triton', triton.__version__, 'transformers', t.__version__)"
    } 2>&1 | tee "$out_dir/versions.txt"
    if [[ -f $tokenizer_dir/tokenizer.json ]]; then
        export DUALTOWER_TOKENIZER_DIR=$tokenizer_dir
    else
        echo "no tokenizer at $tokenizer_dir: the data benchmark and the recipe profile will be skipped (see --prepare)"
        unset DUALTOWER_TOKENIZER_DIR  # one set to a folder without a tokenizer must not let them run anyway
    fi
    [[ -f $sampler_library ]] && export DUALTOWER_CSRC_LIBRARY=$PWD/$sampler_library
fi

# The tests run each kernel's first config (a third of the compiling); the kernel benchmarks autotune and check
# the tuned config's result against the reference before timing it.
# Only the files that hold gpu tests: collecting the whole suite took a good part of the stage on the H200.
mapfile -t gpu_test_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
((${#gpu_test_files[@]})) || gpu_test_files=(tests)
run_stage gpu_tests 150 env DUALTOWER_AUTOTUNE=0 python -m pytest "${gpu_test_files[@]}" -m gpu -q -p no:cacheprovider \
    --junitxml="$out_dir/gpu_tests.xml"
bench_stage train 90 benchmarks/bench_train.py -m "not slow and not compiled" -k "not cpu"  # CPU: CI's
# The compiled training step (the training issue's headline figure) before what the last run measured already.
bench_stage train_compiled 180 benchmarks/bench_train.py -m "compiled and not slow" -k "not cpu"  # CPU: CI's
bench_stage decode 100 benchmarks/bench_decode.py
bench_stage kernels 90 benchmarks/bench_kernels.py -m "not slow and not compiled"
others=()
for file in benchmarks/bench_*.py; do
    case $file in */bench_train.py|*/bench_decode.py|*/bench_kernels.py) ;; *) others+=("$file") ;; esac
done
((${#others[@]})) && bench_stage other_benchmarks 60 "${others[@]}" -m "not slow and not compiled"
if [[ $mode == dry || -n ${DUALTOWER_TOKENIZER_DIR:-} ]]; then
    run_stage profile_360m 600 python train/main.py --config train/configs/cauldron_360m.toml \
        --data.source=synthetic --model.vision_backbone= --model.lm_backbone= \
        --model.tokenizer_id="$tokenizer_dir" --data.num_workers=4 --training.steps=6 --training.micro_batches=1 \
        --profile "--profile.steps=[6]" --checkpoint.enabled=false --checkpoint.export_final=false \
        --eval.at_end=false --metrics.wandb=false --metrics.progress=none --job.run_dir="$out_dir/profile_360m"
elif [[ -z ${GPU_CHECK_STAGES:-} || ",$GPU_CHECK_STAGES," == *",profile_360m,"* ]]; then
    statuses+=("profile_360m: skipped (no tokenizer at $tokenizer_dir; see --prepare)")
fi
bench_stage compiled 600 benchmarks -m "compiled and not slow" --ignore=benchmarks/bench_train.py
[[ $mode == dry ]] && exit 0

shopt -s nullglob
results=()
for stage in "${bench_stages[@]}"; do
    [[ -s $out_dir/$stage.json ]] && results+=("$out_dir/$stage.json")
done
results+=("$out_dir/results.jsonl")  # what the stages cut short measured
traces=("$out_dir"/profile/*.json "$out_dir"/profile_360m/profile/*.json)
{
    cat "$out_dir/versions.txt"
    echo
    printf '%s\n' "${statuses[@]}"
    echo
    python scripts/summarize_benchmarks.py "${results[@]}"
    for trace in "${traces[@]}"; do
        echo
        echo "step breakdown: $trace"
        python -m dualtower.trace_breakdown "$trace" && gzip -f "$trace"  # traces are large; gzip keeps them
    done
    echo
    echo "failed or timed-out stages: ${failed[*]:-none}; total $SECONDS s"
} 2>&1 | tee "$out_dir/summary.md"
exit $((${#failed[@]} > 0))
