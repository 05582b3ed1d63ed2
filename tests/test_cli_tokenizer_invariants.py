"""Invariants of the generate CLI, the tokenizer's resolution and caches, PackedBatch's counts and the Python side
of the fused CUDA sampler that the other tests left unchecked (found by a mutation audit).

Everything here runs without a model, a GPU or the network: the CLI's model, generator and profiler are scripted,
the CUDA op is a recording stand-in, and the tokenizer's builder is replaced where only resolution matters.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from dualtower import generate as cli
from dualtower import tokenizer as tokmod
from dualtower.batch import PackedBatch
from dualtower.generation import GenerationResult, SamplingConfig, csrc_sampler
from dualtower.generation.sampling import batch_seed
from dualtower.tokenizer import TokenizerError, find_smollm2_gguf, verify_tokenizer

# -- the CLI, with a scripted model -----------------------------------------------------------------------------


class ScriptedGenerator:
    """Stands in for Generator: records its construction and every batch; answers with fixed texts."""

    instances: ClassVar[list[ScriptedGenerator]] = []

    def __init__(self, model: Any, tokenizer: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.batches: list[tuple[list[str], SamplingConfig]] = []
        self.stats = SimpleNamespace(summary=lambda: "scripted")
        ScriptedGenerator.instances.append(self)

    def generate(self, batch: list[Any], sampling: SamplingConfig, on_text: Any = None) -> list[GenerationResult]:
        self.batches.append(([request.prompt for request in batch], sampling))
        return [GenerationResult(f" {request.prompt}! ", [7, 8, 9], "length") for request in batch]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[ScriptedGenerator]:
    """The CLI without a model: load_model returns nothing and the generator is scripted."""
    from dualtower import generation

    ScriptedGenerator.instances = []
    monkeypatch.setattr(cli, "load_model", lambda args, device: (None, None))
    monkeypatch.setattr(generation, "Generator", ScriptedGenerator)
    return ScriptedGenerator.instances


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int | str | None, str, str]:
    try:
        code: int | str | None = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max_new_tokens", "0"), "--max_new_tokens must be >= 1"),
        (("--top_p", "0"), "--top_p must be in (0, 1]"),  # p = 0 keeps no token at all
        (("--top_p", "1.0000001"), "--top_p must be in (0, 1]"),
        (("--top_k", "-1"), "--top_k must be >= 0"),
        (("--temperature", "0"), "--temperature must be > 0"),
        (("--batch_size", "0"), "--batch_size must be >= 1"),  # range(0, n, 0) would crash mid-run
        (("--profile_steps", "0"), "--profile_steps must be >= 1"),
        (("--requests", "r.jsonl", "--prompt", "x"), "--requests cannot be combined"),  # the prompt was dropped
        (("--requests", "r.jsonl", "--image", "a.png"), "--requests cannot be combined"),
    ],
)
def test_out_of_range_flags_are_usage_errors_before_anything_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    # Exit 2 (usage) with one line, not 1 (a run-time failure) nor a run that silently ignores the flag.
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path, *flags)
    assert code == cli.EXIT_USAGE
    assert out == "" and err.count("\n") == 1 and message in err


def test_profile_traces_only_the_first_batch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted: list
) -> None:
    """--profile writes one trace, of the first batch; later batches are generated normally."""
    from dualtower.generation import profiling

    profiled: list[tuple[Path, int]] = []

    class RecordingProfiler:
        def __init__(self, folder: Path, decode_steps: int) -> None:
            self.folder, self.decode_steps = folder, decode_steps

        def run(self, generator: Any, call: Any, warm_up: Any = None) -> Any:
            profiled.append((self.folder, self.decode_steps))
            return call()

    monkeypatch.setattr(profiling, "GenerationProfiler", RecordingProfiler)
    prompts = [arg for p in ("a", "b", "c") for arg in ("--prompt", p)]
    argv = ("--checkpoint", tmp_path, *prompts, "--batch_size", 2, "--profile", tmp_path / "trace")
    code, out, err = run_cli(capsys, *argv, "--profile_steps", 3)
    assert code == 0, err
    assert profiled == [(tmp_path / "trace", 3)]
    assert [batch for batch, _ in scripted[0].batches] == [["a", "b"], ["c"]]
    assert out == "a!\nb!\nc!\n"


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # 130 = 128 + SIGINT: what shells and scripts expect from an interrupted command (1 means "failed").
    def interrupted(args: argparse.Namespace) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    code, out, _ = run_cli(capsys, "--checkpoint", "x", "--prompt", "p")
    assert code == 130 and out == ""


def test_stream_syncs_every_step_and_batches_are_seeded_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scripted: list
) -> None:
    """--stream needs a host sync after every token (else text arrives in bursts); batch mode must not pay it."""
    prompts = ("--prompt", "a", "--prompt", "b", "--prompt", "c")
    common = ("--checkpoint", tmp_path, *prompts, "--device", "cpu", "--sampling", "--seed", 11)
    code, streamed, err = run_cli(capsys, *common, "--stream")
    assert code == 0, err
    assert streamed == "\n" * 3  # the scripted generator streams nothing: one line end per request
    code, batched, err = run_cli(capsys, *common, "--batch_size", 2, "--jsonl")
    assert code == 0, err
    stream_gen, batch_gen = scripted
    assert stream_gen.kwargs["sync_every"] == 1 and batch_gen.kwargs["sync_every"] is None
    assert stream_gen.kwargs["cuda_graph"] is False and stream_gen.kwargs["sampler"] == "torch"
    assert [len(b) for b, _ in stream_gen.batches] == [1, 1, 1]
    assert [s.seed for _, s in batch_gen.batches] == [11, batch_seed(11, 2)]
    rows = [json.loads(line) for line in batched.splitlines()]
    # --jsonl keeps the exact text (surrounding spaces included) and counts tokens, not characters.
    expected = [{"index": i, "text": f" {p}! ", "finish_reason": "length", "tokens": 3} for i, p in enumerate("abc")]
    assert rows == expected


@pytest.mark.parametrize(
    ("device", "flag", "expected"),
    [("cuda", "auto", torch.bfloat16), ("cpu", "auto", torch.float32), ("cuda", "float16", torch.float16)],
)
def test_load_model_picks_the_dtype_and_the_weights_files_folder_for_the_tokenizer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str, flag: str, expected: torch.dtype
) -> None:
    """auto = bf16 on CUDA (fp32 there doubles the memory and halves the speed), fp32 elsewhere; a weights file's
    tokenizer is looked for in its folder."""
    from dualtower import model as model_module
    from dualtower.adapters import common

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    loaded: dict[str, Any] = {}

    def from_pretrained(source: Path, **kwargs: Any) -> Any:
        loaded.update(kwargs, source=source)
        return SimpleNamespace(requires_grad_=lambda flag: None, cfg=SimpleNamespace(tokenizer_id="tok/id"))

    monkeypatch.setattr(common, "resolve_source", lambda checkpoint: Path(checkpoint))
    monkeypatch.setattr(model_module.DualTowerVLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(tokmod, "load_tokenizer", lambda directory, tokenizer_id: (directory, tokenizer_id))
    args = cli.build_parser().parse_args(["--checkpoint", str(weights), "--dtype", flag])
    _, tokenizer = cli.load_model(args, torch.device(device))
    assert loaded["dtype"] == expected and loaded["device"] == torch.device(device)
    assert tokenizer == (tmp_path, "tok/id")


# -- the tokenizer ------------------------------------------------------------------------------------------


def test_extra_token_attributes_name_their_own_row_and_column() -> None:
    """`tokenizer.r2c1` is the tile in row 2, column 1: the original's prompts index tiles by these names."""
    attributes = tokmod.extra_token_attributes()
    assert attributes["image_token"] == "<|image|>" and attributes["global_image_token"] == "<|global_image|>"
    for row in range(1, 9):
        for col in range(1, 9):
            assert attributes[f"r{row}c{col}"] == f"<row_{row}_col_{col}>"


def test_a_gguf_tokenizer_id_that_is_the_fallback_is_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A failing source listed twice is built (seconds, for a GGUF) and warned about twice.
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda: False)
    gguf = find_smollm2_gguf()
    assert gguf is not None
    assert tokmod._candidate_sources(None, str(gguf)) == [f"gguf:{gguf.resolve()}"]


def test_a_local_tokenizer_directory_is_used_by_its_absolute_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """tokenizer_id may be a local folder: taken as a folder (resolved), not as a Hub id nor skipped offline."""
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda: False)
    monkeypatch.setattr(tokmod, "_hub_cached", lambda repo_id: False)
    monkeypatch.delenv("DUALTOWER_TOKENIZER_DIR", raising=False)
    (tmp_path / "my_tokenizer").mkdir()
    monkeypatch.chdir(tmp_path)
    assert tokmod._candidate_sources(None, "my_tokenizer")[0] == str((tmp_path / "my_tokenizer").resolve())


def test_a_source_is_built_once_per_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Building converts files (seconds): every later load of the same source must be a cache hit.
    builds: list[str] = []

    def build(source: str) -> SimpleNamespace:
        builds.append(source)
        return SimpleNamespace(source=source)

    monkeypatch.setattr(tokmod, "_cache", {})
    monkeypatch.setattr(tokmod, "_build", build)
    (tmp_path / "tokenizer.json").write_text("{}")
    first = tokmod.load_tokenizer(tmp_path, tokenizer_id="no/such-repo")
    assert tokmod.load_tokenizer(tmp_path, tokenizer_id="no/such-repo") is first
    assert builds == [str(tmp_path.resolve())]


@pytest.mark.parametrize(("pre", "split"), [("smollm", True), ("starcoder", True), ("gpt2", False), (None, False)])
def test_the_digit_split_follows_the_ggufs_pre_tokenizer(
    monkeypatch: pytest.MonkeyPatch, pre: str | None, split: bool
) -> None:
    """Only llama.cpp pre-tokenizers that isolate digits get the Digits step (SmolLM2's is "smollm")."""
    from tokenizers import pre_tokenizers

    metadata = {} if pre is None else {"tokenizer.ggml.pre": pre}
    monkeypatch.setattr(tokmod, "_gguf_tokenizer_metadata", lambda path: metadata)
    fake = SimpleNamespace(backend_tokenizer=SimpleNamespace(pre_tokenizer=None))
    tokmod._set_gguf_pre_tokenizer(fake, Path("model.gguf"))
    assert isinstance(fake.backend_tokenizer.pre_tokenizer, pre_tokenizers.Sequence) is split


@pytest.mark.parametrize("value", ["0", "off", "OFF", "none", "false", "False"])
def test_every_documented_off_value_disables_the_gguf_disk_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("DUALTOWER_CACHE", value)
    assert tokmod._gguf_cache_dir(tmp_path / "x.gguf") is None


def test_the_gguf_disk_cache_is_keyed_by_the_files_mtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A GGUF replaced in place by another of the same size must not reuse the old file's converted tokenizer.
    monkeypatch.setenv("DUALTOWER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    before = tokmod._gguf_cache_dir(gguf)
    os.utime(gguf, ns=(2_000_000_000, 2_000_000_000))
    assert tokmod._gguf_cache_dir(gguf) != before


def test_verify_rejects_a_pad_token_that_is_not_eos() -> None:
    """Padding with another id than EOS shifts the original's loss masking and stop rule."""
    ids = list(range(49152, 49218))
    padded_apart = SimpleNamespace(
        convert_tokens_to_ids=lambda tokens: ids, eos_token="<|im_end|>", pad_token_id=0, eos_token_id=2
    )
    with pytest.raises(TokenizerError, match="pad = eos"):
        verify_tokenizer(padded_apart)


@pytest.mark.parametrize(
    ("value", "offline"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
     ("0", False), ("", False), ("false", False), ("FALSE", False), ("no", False), ("off", False)],
)  # fmt: skip
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch: pytest.MonkeyPatch, value: str,
                                                            offline: bool) -> None:
    # huggingface_hub reads 1 / ON / YES / TRUE (any case) as offline and everything else as online. Offline, a
    # probe that succeeds would send transformers to the network; online ("no", "FALSE"), skipping the probe
    # would quietly take the GGUF fallback instead of the Hub tokenizer.
    probes: list[object] = []

    class Connected:
        def __enter__(self) -> Connected:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def create_connection(address: object, timeout: float | None = None) -> Connected:
        probes.append(address)
        return Connected()

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    tokmod._hub_reachable.cache_clear()
    try:
        assert tokmod._hub_reachable() is not offline
        assert len(probes) == (0 if offline else 1)
    finally:
        tokmod._hub_reachable.cache_clear()


# -- PackedBatch --------------------------------------------------------------------------------------------


def small_batch() -> PackedBatch:
    """Three documents: prefix lengths 3, 0, 2 and text lengths 2, 4, 1 (one text-only document)."""
    prefix_lens, text_lens = [3, 0, 2], [2, 4, 1]

    def cu(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    return PackedBatch(
        prefix_ids=torch.arange(5), text_ids=torch.arange(100, 107), labels=torch.full((7,), -100),
        cu_prefix=cu(prefix_lens), cu_text=cu(text_lens),
        prefix_positions=torch.tensor([0, 1, 2, 0, 1]), text_positions=torch.tensor([3, 4, 0, 1, 2, 3, 2]),
        pixel_values=torch.zeros(2, 3, 4, 4), tiles_per_doc=torch.tensor([1, 0, 1]),
        image_token_index=torch.tensor([2, 4]), doc_row=torch.tensor([0, 0, 1]),
        max_prefix_len=3, max_text_len=4, num_rows=2, row_capacity=16, num_supervised=0,
    )


def test_packed_batch_counts_both_towers_tokens_and_moves_whole() -> None:
    # num_tokens feeds tokens/s and packing efficiency: the prefix tokens are real work too.
    batch = small_batch()
    assert batch.num_docs == 3 and batch.num_tokens == 5 + 7
    moved = batch.to("cpu")
    assert moved.num_tokens == 12 and moved.max_text_len == 4 and moved.row_capacity == 16
    assert torch.equal(moved.cu_text, batch.cu_text) and moved.cu_text.dtype == torch.int32


# -- the fused CUDA sampler's Python side -------------------------------------------------------------------


@pytest.fixture
def recorded_op(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A stand-in for torch.ops.dualtower.sample_logits that records its arguments and returns argmax."""
    calls: list[tuple] = []

    def op(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        calls.append((logits, uniforms, temperature, top_k, top_p))
        return logits.argmax(-1)

    monkeypatch.setattr(torch.ops.dualtower, csrc_sampler.OP_NAME, op, raising=False)
    return calls


def test_fused_greedy_passes_the_kernels_greedy_arguments(recorded_op: list[tuple]) -> None:
    """Greedy is do_sample=False whatever the (default 0.7) temperature: no uniforms, temperature 0, no filters."""
    logits = torch.randn(3, 37, dtype=torch.bfloat16)
    tokens = csrc_sampler.fused_sample(logits, SamplingConfig(do_sample=False, temperature=0.7, top_k=5, top_p=0.5))
    (scores, uniforms, temperature, top_k, top_p), = recorded_op
    assert scores.dtype == torch.float32 and scores.is_contiguous() and uniforms.numel() == 0
    assert (temperature, top_k, top_p) == (0.0, 0, 1.0)
    assert torch.equal(tokens, logits.float().argmax(-1))


def test_fused_sampling_passes_each_knob_in_its_place(recorded_op: list[tuple]) -> None:
    logits = torch.randn(5, 37).t().contiguous().t()[:, :29]  # a strided (non-contiguous) view
    config = SamplingConfig(do_sample=True, temperature=1.3, top_k=7, top_p=0.85)
    generator = torch.Generator().manual_seed(3)
    csrc_sampler.fused_sample(logits, config, generator)
    (scores, uniforms, temperature, top_k, top_p), = recorded_op
    assert scores.is_contiguous() and torch.equal(scores, logits)
    assert (temperature, top_k, top_p) == (1.3, 7, 0.85)
    # One uniform per row, drawn from the given generator: a seed reproduces the draws.
    assert torch.equal(uniforms, torch.rand(5, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    ("arch_list", "capability", "runs"),
    [("9.0a", (10, 0), False), ("9.0a", (9, 1), False), ("10.0a+PTX", (10, 3), True), ("9.0a+PTX", (8, 9), False)],
)
def test_architecture_specific_code_runs_only_on_its_own_gpu(
    arch_list: str, capability: tuple[int, int], runs: bool
) -> None:
    # sm_90a machine code has no forward compatibility, unlike sm_90; its PTX (if any) still JITs forward.
    assert csrc_sampler._runs_on(arch_list, capability) is runs


def test_a_prebuilt_library_loads_on_an_install_without_csrc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A wheel install has no csrc/ to hash: the library must then be accepted on the torch build alone."""
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(csrc_sampler, "_register_fake", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = {**csrc_sampler._this_build(), "arch_list": "9.0+PTX", "source_sha256": "f" * 64}
    (tmp_path / csrc_sampler.BUILT_FOR).write_text(json.dumps(record))
    library = tmp_path / f"{csrc_sampler.EXTENSION_NAME}.so"
    monkeypatch.setenv("DUALTOWER_CSRC_DIR", str(tmp_path / "no_csrc_here"))
    assert csrc_sampler._load_prebuilt(library) and loaded == [str(library)]
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # the torch build must still match
    assert not csrc_sampler._load_prebuilt(library)


@pytest.mark.parametrize("previous", [None, "8.0"])
def test_build_library_restores_the_arch_list_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, previous: str | None
) -> None:
    # The build sets TORCH_CUDA_ARCH_LIST for itself only: a later JIT build in this process must see the old one.
    seen: list[str | None] = []
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    def jit_build(**kwargs: object) -> None:
        seen.append(os.environ.get("TORCH_CUDA_ARCH_LIST"))

    monkeypatch.setattr(csrc_sampler, "_jit_build", jit_build)
    if previous is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", previous)
    library = csrc_sampler.build_library(tmp_path / "out", arch_list="9.0a")
    assert seen == ["9.0a"] and os.environ.get("TORCH_CUDA_ARCH_LIST") == previous
    assert library.parent == tmp_path / "out"
    assert json.loads((tmp_path / "out" / csrc_sampler.BUILT_FOR).read_text())["arch_list"] == "9.0a"
