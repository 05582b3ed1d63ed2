"""Profiler traces of training steps and of generation, and the step breakdown read back from a trace."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dualtower.generate import main as generate_main
from dualtower.generation import Generator, PreparedPrompt, SamplingConfig
from dualtower.generation.profiling import GenerationProfiler
from dualtower.model import DualTowerVLM
from dualtower.trace_breakdown import breakdown, format_breakdown, load_trace
from dualtower.trace_breakdown import main as breakdown_main
from dualtower.training.profiling import StepProfiler


def _names(trace: Path) -> set[str]:
    return {event.get("name", "") for event in load_trace(trace)}


def test_step_profiler_traces_only_the_chosen_steps(tmp_path: Path) -> None:
    cfg = SimpleNamespace(enabled=True, steps=(2,), folder="profile")
    profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    weight = torch.randn(64, 64, requires_grad=True)
    optimizer = torch.optim.AdamW([weight])
    for step in (1, 2, 3):
        with profiler.step(step):
            (torch.randn(32, 64) @ weight).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    written = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert written == ["step_000002_rank0.json", "step_000002_rank0.txt"]
    result = breakdown(load_trace(tmp_path / "profile" / "step_000002_rank0.json"))
    assert not result.device
    assert result.categories["matmul"] > 0
    assert all(result.phases[phase] > 0 for phase in ("forward", "backward", "optimizer"))


def test_step_profiler_warns_about_steps_it_will_never_trace(caplog) -> None:
    cfg = SimpleNamespace(enabled=True, steps=(2, 5, 9), folder="profile")
    with caplog.at_level(logging.WARNING, logger="dualtower.training.profiling"):
        StepProfiler(cfg, Path("run"), rank=0, device=torch.device("cpu")).warn_untraced(4, 8)  # resumed at 3
        StepProfiler(cfg, Path("run"), rank=0, device=torch.device("cpu")).warn_untraced(2, 9)  # all reachable
        StepProfiler(cfg, Path("run"), rank=1, device=torch.device("cpu")).warn_untraced(4, 8)  # rank 0 says it
        StepProfiler(cfg, Path("run"), rank=0, device=torch.device("cpu")).warn_untraced(11, 10)  # nothing to train
    assert [r.getMessage() for r in caplog.records] == [
        "profile.steps 2, 9 will not be traced: this run trains steps 4..8",
        "profile.steps 2, 5, 9 will not be traced: this run trains no steps",
    ]


def test_training_past_its_last_step_warns_about_the_untraced_profile_step(tmp_path, caplog) -> None:
    from test_train_utils import build_trainer, default_job, make_batches, tiny_model

    cfg = default_job()
    cfg.training.steps, cfg.profile.enabled, cfg.profile.steps = 1, True, (3,)
    trainer = build_trainer(tiny_model(), make_batches(tiny_model(), [[(0, 0, 4)]]), tmp_path, cfg)
    with caplog.at_level(logging.WARNING, logger="dualtower.training.profiling"):
        trainer.train()
    assert trainer.step == 1 and not (tmp_path / "profile").exists()
    assert "profile.steps 3 will not be traced: this run trains steps 1..1" in caplog.text


def test_training_hands_the_profiler_one_based_optimizer_steps(tmp_path) -> None:
    import contextlib

    from test_train_utils import build_trainer, default_job, make_batches, tiny_model

    cfg = default_job()
    cfg.training.steps = 2
    trainer = build_trainer(tiny_model(), make_batches(tiny_model(), [[(0, 0, 4)]]), tmp_path, cfg)
    wrapped = []  # (step given to the profiler, steps finished inside its block)

    @contextlib.contextmanager
    def step(number: int):
        yield
        wrapped.append((number, trainer.step))

    trainer.parts.profiler.step = step
    trainer.train()
    assert wrapped == [(1, 0), (2, 1)]  # step n is traced while it runs (trainer.step counts finished ones)


def test_step_profiler_counts_the_seconds_spent_writing_traces(tmp_path, monkeypatch) -> None:
    import time

    real_export = torch.profiler.profile.export_chrome_trace

    def slow_export(self, path: str) -> None:
        time.sleep(0.3)
        real_export(self, path)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", slow_export)
    cfg = SimpleNamespace(enabled=True, steps=(1,), folder="profile")
    profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    with profiler.step(2):  # not traced
        pass
    assert profiler.take_writing_seconds() == 0.0
    with profiler.step(1):
        torch.randn(8, 8).sum()
    assert profiler.take_writing_seconds() >= 0.3
    assert profiler.take_writing_seconds() == 0.0  # taken once


def test_trace_writing_is_not_counted_as_training_time(tmp_path) -> None:
    """tokens_per_s of a window with a traced step leaves out the time the trace took to write."""
    from test_train_utils import build_trainer, default_job, make_batches, read_metrics, tiny_model

    cfg = default_job()
    cfg.training.steps = 1
    trainer = build_trainer(tiny_model(), make_batches(tiny_model(), [[(0, 0, 4)]]), tmp_path, cfg)
    trainer.parts.profiler.take_writing_seconds = lambda: 1e6  # far longer than the step itself
    trainer.train()
    assert read_metrics(tmp_path)[0]["tokens_per_s"] > 1e9  # elapsed = wall time - 1e6 s, floored at 1e-9 s


def _event(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1, ext: int | None = None) -> dict:
    args = {} if ext is None else {"External id": ext}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}


def test_breakdown_of_a_gpu_trace_by_phase_category_and_busy_time() -> None:
    """Kernels take the phase of the operator that launched them; the GPU idles 40 us of a 100 us span."""
    events = [
        _event("aten::mm", 0, 10, ext=1),
        _event("autograd::engine::evaluate_function: MmBackward0", 20, 30, tid=2),
        _event("aten::mm", 22, 10, tid=2, ext=2),
        _event("Optimizer.step#AdamW.step", 60, 20, cat="user_annotation"),
        _event("aten::_fused_adamw_", 61, 10, ext=3),
        _event("sm90_xmma_gemm_bf16", 0, 20, cat="kernel", ext=1),
        _event("nvjet_hsh_gemm", 30, 20, cat="kernel", ext=2),
        _event("void multi_tensor_apply_kernel<AdamW>", 80, 10, cat="kernel", ext=3),
        _event("Memcpy HtoD", 90, 10, cat="gpu_memcpy"),
    ]
    result = breakdown(events)
    assert result.device
    assert result.total_ms == pytest.approx(0.060)
    assert dict(result.phases) == pytest.approx({"forward": 0.030, "backward": 0.020, "optimizer": 0.010})
    assert dict(result.categories) == pytest.approx({"matmul": 0.040, "optimizer": 0.010, "memory": 0.010})
    assert result.span_ms == pytest.approx(0.100)
    assert result.busy_ms == pytest.approx(0.060)
    text = format_breakdown(result)
    assert "GPU busy" in text and "| backward | 0.02 | 33.3% |" in text


def test_breakdown_of_a_cpu_trace_counts_exclusive_time() -> None:
    events = [_event("aten::linear", 0, 100), _event("aten::mm", 10, 70), _event("aten::add_", 85, 10)]
    result = breakdown(events)
    assert not result.device
    assert result.names["aten::linear"][1] == pytest.approx(0.020)  # 100 us minus its children's 80 us
    assert result.total_ms == pytest.approx(0.100)


def test_ops_inside_our_custom_ops_count_under_the_ops_category() -> None:
    """The chunked loss's generic GEMM / exp on CPU, and a GEMM kernel launched inside the loss op on GPU."""
    cpu = [
        _event("dualtower::linear_cross_entropy_fwd", 0, 100),
        _event("aten::mm", 10, 50),
        _event("aten::exp_", 65, 20),
        _event("aten::mm", 120, 30),
        _event("dualtower::sample_logits", 200, 10),  # no category of its own: its children keep theirs
        _event("aten::mm", 202, 5),
    ]
    assert dict(breakdown(cpu).categories) == pytest.approx({"cross-entropy": 0.100, "matmul": 0.035, "other": 0.005})
    gpu = [
        _event("dualtower::linear_cross_entropy_fwd", 0, 50),
        _event("aten::mm", 5, 10, ext=1),
        _event("aten::mm", 60, 10, ext=2),
        _event("nvjet_hsh_gemm", 10, 20, cat="kernel", ext=1),
        _event("nvjet_hsh_gemm", 70, 30, cat="kernel", ext=2),
    ]
    assert dict(breakdown(gpu).categories) == pytest.approx({"cross-entropy": 0.020, "matmul": 0.030})


def test_the_backward_node_of_a_custom_op_counts_under_the_ops_category() -> None:
    """autograd names the backward of a torch.library op `GeneratedBackwardFor_dualtower_<op>_...Backward`."""
    node = "GeneratedBackwardFor_dualtower_linear_cross_entropy_fwd_defaultBackward"
    events = [
        _event(f"autograd::engine::evaluate_function: {node}", 0, 100, tid=2),
        _event(node, 1, 98, tid=2),
        _event("aten::mul", 10, 60, tid=2),  # the chunked loss's gradient, recomputed in backward
        _event("aten::mm", 75, 20, tid=2),
        _event("autograd::engine::evaluate_function: MmBackward0", 100, 10, tid=2),
        _event("aten::mm", 101, 9, tid=2),
    ]
    result = breakdown(events)
    assert dict(result.categories) == pytest.approx({"cross-entropy": 0.100, "matmul": 0.009, "other": 0.001})
    assert dict(result.phases) == pytest.approx({"backward": 0.110})


def test_cli_reads_a_folder_of_traces_and_rejects_the_text_table(tmp_path, capsys) -> None:
    trace = {"traceEvents": [_event("aten::mm", 0, 10)]}
    for name in ("step_000003_rank0", "step_000004_rank0"):
        (tmp_path / f"{name}.json").write_text(json.dumps(trace))
        (tmp_path / f"{name}.txt").write_text("---- the profiler's table ----")
    assert breakdown_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## step_000003_rank0.json" in out and "## step_000004_rank0.json" in out and out.count("| matmul |") == 2
    assert breakdown_main([str(tmp_path / "step_000003_rank0.txt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "profiler's text table; pass the trace beside it" in err[0], err
    (tmp_path / "results.json").write_text(json.dumps({"benchmarks": []}))
    assert breakdown_main([str(tmp_path / "results.json")]) == 2
    assert "is not a chrome trace" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert breakdown_main([str(tmp_path / "empty")]) == 2
    assert "error: no traces" in capsys.readouterr().err


def test_a_real_chunked_loss_trace_is_cross_entropy_time(tmp_path: Path) -> None:
    from dualtower_kernels.linear_cross_entropy import linear_cross_entropy_chunked

    hidden, weight = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
    labels = torch.randint(0, 1000, (64,)).masked_fill(torch.arange(64) % 3 == 0, -100)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        linear_cross_entropy_chunked(hidden, weight, labels).backward()
    prof.export_chrome_trace(str(tmp_path / "loss.json"))
    result = breakdown(load_trace(tmp_path / "loss.json"))
    assert result.names["aten::mm"][1] > 0 and result.categories["matmul"] == 0
    assert result.categories["cross-entropy"] > 0.8 * result.total_ms


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dualtower.tokenizer import load_tokenizer

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("checkpoint")
    DualTowerVLM.from_flavor("debug").save_pretrained(directory, load_tokenizer())
    return directory


def test_generate_profile_traces_left_tower_and_first_decode_steps(tmp_path, capsys, checkpoint) -> None:
    image = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (200, 30, 40)).save(image)
    out = tmp_path / "profile"
    argv = ["--checkpoint", checkpoint, "--image", image, "--prompt", "Colour?", "--max_new_tokens", 6]
    code = generate_main([str(a) for a in [*argv, "--profile", out, "--profile_steps", 2]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.count("\n") == 1  # the answer, printed once
    names = _names(out / "generate.json")
    assert {"generate/left_tower", "generate/decode_step_1", "generate/decode_step_2"} <= names
    assert "generate/decode_step_3" not in names  # the profiler stopped after two steps
    assert (out / "generate.txt").read_text().strip()
    assert breakdown_main([str(out / "generate.json")]) == 0
    assert "| phase | ms | share |" in capsys.readouterr().out


def test_generation_profiler_restores_the_generator(tmp_path, checkpoint) -> None:
    model = DualTowerVLM.from_pretrained(checkpoint).requires_grad_(False)
    cfg = model.cfg
    ids = [1, 9, 10, cfg.global_image_token_id, *[cfg.image_token_id] * cfg.image_tokens_per_tile, 300, 301]
    prompt = PreparedPrompt(torch.tensor(ids), torch.rand(1, 3, cfg.tile_size, cfg.tile_size), len(ids) - 2)
    generator = Generator(model, eos_token_ids=())
    config = SamplingConfig(max_new_tokens=4)
    expected = generator.generate_prepared([prompt], config)[0].token_ids
    generator.prefix_cache.clear()
    profiler = GenerationProfiler(tmp_path, decode_steps=1, name="one_step")
    results = profiler.run(generator, lambda: generator.generate_prepared([prompt], config))
    assert results[0].token_ids == expected  # tracing changes nothing
    assert generator.phase_hook is None  # the profiler's hook is gone: later calls are not labelled
    names = _names(tmp_path / "one_step.json")
    assert "generate/decode_step_1" in names and "generate/decode_step_2" not in names
    with pytest.raises(ValueError, match="decode_steps"):
        GenerationProfiler(tmp_path, decode_steps=0)


def test_cli_rejects_a_missing_trace_and_bad_profile_steps(tmp_path, capsys, checkpoint) -> None:
    assert breakdown_main([str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--checkpoint", str(checkpoint), "--profile", str(tmp_path), "--profile_steps", "0"])
    assert exit_.value.code == 2
    assert "--profile_steps must be >= 1" in capsys.readouterr().err
