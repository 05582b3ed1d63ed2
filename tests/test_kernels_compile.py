"""Every Triton kernel compiles for an H100 (sm_90) on this machine, GPU or not, and every config could launch.

The interpreter that runs the kernels in the other CPU tests skips the compiler, so it cannot see what only
compilation shows: tl.dot shape rules, shared memory per block, register spills, whether 16-bit dots became
tensor-core (wgmma) instructions. dualtower_kernels.compile_check compiles each config without launching it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from dualtower_kernels import compile_check

ATTENTION = ("_prefix_attn_fwd_kernel", "_prefix_attn_dq_kernel", "_prefix_attn_dkdv_kernel")
PROJECTOR = ("_project_fwd_kernel", "_project_dx_kernel", "_project_dw_kernel")
UNTUNED = {"_ce_rows_kernel": 2, "_decode_split_kernel": 1, "_decode_combine_kernel": 1}  # launches per dtype
ONE_EACH = dict.fromkeys(ATTENTION + PROJECTOR, 1) | UNTUNED


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")  # compile for real, not from an earlier cache
    run = subprocess.run(
        [sys.executable, "-m", "dualtower_kernels.compile_check", "--arch", "90", "--json", str(out / "v.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "v.json").read_text())


def _count(variants: list[dict], dtype: str, defaults_only: bool = False) -> Counter:
    return Counter(
        (v["flavor"], v["kernel"]) for v in variants if v["dtype"] == dtype and (v["default"] or not defaults_only)
    )


def _per_flavor(counts: dict[str, int]) -> Counter:
    return Counter({(flavor, kernel): n for flavor in compile_check.FLAVORS for kernel, n in counts.items()})


def test_every_autotuning_config_compiles_for_16_bit_inputs(variants) -> None:
    tuned = {name: 3 for name in ATTENTION} | {name: 4 for name in PROJECTOR}  # the configs each one lists
    assert _count(variants, "bfloat16") == _per_flavor(tuned | UNTUNED)
    assert _count(variants, "bfloat16", defaults_only=True) == _per_flavor(ONE_EACH)


def test_fp32_inputs_compile_one_small_config(variants) -> None:
    assert _count(variants, "float32") == _per_flavor(ONE_EACH)
    for v in variants:
        if v["dtype"] == "float32" and v["kernel"] in ATTENTION + PROJECTOR:
            assert max(size for name, size in v["config"].items() if name != "BLOCK_D") <= 32, v


def test_16_bit_dots_use_tensor_cores(variants) -> None:
    for v in variants:
        if v["dtype"] == "bfloat16" and v["kernel"] in ATTENTION + PROJECTOR:
            assert v["tensor_cores"] == "wgmma", v
        if v["kernel"] == "_decode_split_kernel" and v["dtype"] == "bfloat16":
            assert v["tensor_cores"] == "mma", v  # 16 query rows: below wgmma's 64, mma.sync instead


def test_configs_fit_an_h100_without_spilling(variants) -> None:
    assert compile_check.problems([compile_check.Variant(**v) for v in variants], compile_check.CARDS[90]) == []
    assert [v for v in variants if v["local_bytes"]] == []


def test_problems_names_a_config_over_the_cards_shared_memory() -> None:
    card = compile_check.CARDS[80]
    variant = lambda shared, default: compile_check.Variant(
        "k", "debug", "bfloat16", {"BLOCK_M": 64 if default else 128}, 4, 3, default, shared, 128, 0, "mma", 1.0
    )
    fits, too_big = variant(card.shared_bytes, True), variant(card.shared_bytes + 1, False)
    found = compile_check.problems([fits, too_big], card)
    assert len(found) == 1 and "{'BLOCK_M': 128} (tuning config)" in found[0]


def test_compile_check_refuses_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "dualtower_kernels.compile_check", "--family", "decode_attention"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "unset TRITON_INTERPRET" in run.stderr
