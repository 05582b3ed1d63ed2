"""End to end: a saved checkpoint served by `python -m dualtower.generate` (batches of different tile counts,
streaming, stop strings, seeds, stats) and scored through the lmms-eval plugin (generate_until, loglikelihood
at tokenization boundaries, multi-image docs, lmms-eval's simple_evaluate against the offline scorer)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import dualtower.generate as generate_cli
from dualtower.generate import main
from dualtower.generation import engine

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra")

from test_eval_lmms import doc_to_visual, instance, write_task
from test_eval_runner import direct_logprobs, make_checkpoint, sample_images

from dualtower.eval import mmstar
from dualtower.eval.lmms_plugin import DualTowerLMMS
from dualtower.eval.runner import EvalPrompt

TASK, SPLIT = "mmstar", "val"
UNICODE_TEXT = "Hello world 日本😀 end"  # 日, 本 and 😀 are each split over several byte-level tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("e2e_checkpoint"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Any:
    from dualtower.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Different tile counts on the debug model: a wide 3x1 grid, a square single tile, a tall 1x2 grid."""
    folder = tmp_path_factory.mktemp("e2e_images")
    sizes = {"wide": (384, 128), "square": (90, 90), "tall": (100, 200)}
    paths = {}
    for index, (name, size) in enumerate(sizes.items()):
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", size, (40 * index, 200 - 50 * index, 90)).save(paths[name])
    return paths


def run_main(capsys: pytest.CaptureFixture, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class ScriptedSampler:
    """Stands in for the sampler: row r of every call emits its script's next token, then EOS."""

    def __init__(self, scripts: list[list[int]], eos: int):
        self.scripts, self.eos, self.step = scripts, eos, 0

    def __call__(self, logits: torch.Tensor, config: Any, generator: Any = None) -> torch.Tensor:
        rows = [self.scripts[row % len(self.scripts)] for row in range(logits.shape[0])]
        chosen = [script[self.step] if self.step < len(script) else self.eos for script in rows]
        self.step += 1
        return torch.tensor(chosen, device=logits.device)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tokenizer: Any):
    """Install a ScriptedSampler for the Generators the CLI builds; its step restarts with every decode loop."""

    def install(*texts: str) -> ScriptedSampler:
        sampler = ScriptedSampler([tokenizer(t, add_special_tokens=False).input_ids for t in texts], 2)
        original = engine._DecodeLoop.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            sampler.step = 0
            original(self, *args, **kwargs)

        monkeypatch.setattr(engine._DecodeLoop, "__init__", init)
        monkeypatch.setattr(engine, "sample", sampler)
        return sampler

    return install


@pytest.fixture
def stream_pieces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    pieces: list[str] = []
    original = generate_cli._print_delta

    def record(row: int, text: str) -> None:
        pieces.append(text)
        original(row, text)

    monkeypatch.setattr("dualtower.generate._print_delta", record)
    return pieces


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The Generators the CLI builds, to read their stats."""
    import dualtower.generation as generation

    made: list[Any] = []

    class Recording(generation.Generator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generation, "Generator", Recording)
    return made


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


# -- serving ----------------------------------------------------------------------------------------------------


def test_stream_equals_final_text_with_multibyte_unicode(capsys, checkpoint, images, scripted, stream_pieces):
    scripted(UNICODE_TEXT)
    pairs = ("--image", images["wide"], "--prompt", "a?", "--image", images["square"], "--prompt", "b?")
    code, streamed, err = run_main(capsys, "--checkpoint", checkpoint, *pairs, "--max_new_tokens", 20, "--stream")
    assert code == 0, err
    assert streamed == f"{UNICODE_TEXT}\n{UNICODE_TEXT}\n"
    assert "".join(stream_pieces) == UNICODE_TEXT * 2
    assert len(stream_pieces) > 4 and not any("\ufffd" in piece for piece in stream_pieces)
    code, records, err = run_main(capsys, "--checkpoint", checkpoint, *pairs, "--max_new_tokens", 20, "--jsonl")
    assert code == 0, err
    assert [(r["text"], r["finish_reason"], r["tokens"]) for r in jsonl(records)] == [(UNICODE_TEXT, "eos", 11)] * 2


@pytest.mark.parametrize(("stop", "kept", "tokens"), [("o w", "Hell", 2), ("本😀", "Hello world 日", 9)])
def test_stop_strings_spanning_tokens_in_a_ragged_batch(capsys, checkpoint, images, scripted, stop, kept, tokens):
    """Row 0 (3 tiles) meets the stop string across a token boundary; row 1 (1 tile) never does."""
    scripted(UNICODE_TEXT, "Fine text")
    pairs = ("--image", images["wide"], "--prompt", "a?", "--image", images["square"], "--prompt", "b?")
    argv = ("--checkpoint", checkpoint, *pairs, "--max_new_tokens", 20, "--stop", stop, "--stop", "never")
    code, records, err = run_main(capsys, *argv, "--jsonl")
    assert code == 0, err
    assert [(r["text"], r["finish_reason"], r["tokens"]) for r in jsonl(records)] == [
        (kept, "stop", tokens),
        ("Fine text", "eos", 3),
    ]
    code, streamed, err = run_main(capsys, *argv, "--stream")
    assert code == 0, err
    assert streamed.split("\n")[:1] == [kept]


def test_sampling_seed_reproduces_and_batches_are_seeded_apart(capsys, checkpoint, images) -> None:
    pairs = ("--image", images["tall"], "--prompt", "Hm?", "--image", images["tall"], "--prompt", "Hm?")
    sampling = ("--sampling", "--temperature", 2.0, "--top_k", 0, "--top_p", 1, "--max_new_tokens", 6, "--jsonl")
    runs = [run_main(capsys, "--checkpoint", checkpoint, *pairs, *sampling, "--seed", 3) for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]
    first, second = jsonl(runs[0][1])
    # One batch, one torch.Generator: the two equal requests are two rows drawing different noise.
    assert first["text"] != second["text"]


def test_stats_are_consistent(capsys, checkpoint, images, generators) -> None:
    pairs = [("wide", "a?"), ("square", "b?"), ("wide", "c?"), ("tall", "d?")]
    argv = [arg for name, prompt in pairs for arg in ("--image", images[name], "--prompt", prompt)]
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, *argv, "--max_new_tokens", 5, "--stats", "--jsonl")
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("stats:")]
    fields = dict(re.findall(r"([\w/]+)=([\d.]+)", line))
    stats = generators[-1].stats
    assert int(fields["hits"]) == stats.prefix_cache_hits == 1  # the second question about the wide image
    assert int(fields["misses"]) == stats.prefix_cache_misses == 3 and stats.vision_tower_runs >= 1
    assert int(fields["generated_tokens"]) == stats.generated_tokens == sum(r["tokens"] for r in jsonl(out))
    assert int(fields["requests"]) == stats.requests == 4
    assert 0 < stats.ttft_s <= stats.total_s and stats.prefill_s <= stats.ttft_s
    assert stats.ttft_s + stats.decode_s <= stats.total_s
    assert stats.tokens_per_s == pytest.approx(stats.generated_tokens / stats.total_s)
    assert float(fields["tokens/s"]) == pytest.approx(stats.tokens_per_s, abs=0.051)


def test_stream_stats_count_repeated_image_hits_per_request(capsys, checkpoint, images, generators) -> None:
    argv = ("--image", images["square"], "--prompt", "a?", "--prompt", "b?", "--max_new_tokens", 3)
    code, _, err = run_main(capsys, "--checkpoint", checkpoint, *argv, "--stats", "--stream")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("stats:")]
    assert len(lines) == 2  # one line per streamed request
    assert "hits=0 misses=1" in lines[0] and "hits=1 misses=0" in lines[1] and "vision_tower_runs=0" in lines[1]


def test_requests_file_batched_greedy_equals_one_by_one(capsys, checkpoint, images, tmp_path) -> None:
    """Multi-image, single-image and text-only requests of different tile counts in one batch."""
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"images": [images["wide"].name, images["tall"].name], "prompt": "Compare them."},
        {"image": images["square"].name, "prompt": "Grey?"},
        {"images": [], "prompt": "No image, 日本?"},
        {"image": images["wide"].name, "prompt": "Again."},
    ]
    requests.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    for path in images.values():  # the paths are relative to the requests file's folder
        (tmp_path / path.name).write_bytes(path.read_bytes())
    argv = ("--checkpoint", checkpoint, "--requests", requests, "--max_new_tokens", 6, "--jsonl")
    code, batched, err = run_main(capsys, *argv, "--batch_size", 4)
    assert code == 0, err
    code, single, err = run_main(capsys, *argv, "--batch_size", 1)
    assert code == 0, err
    assert jsonl(batched) == jsonl(single) and len(jsonl(batched)) == 4


def test_requests_file_rejects_per_request_settings(capsys, checkpoint, images, tmp_path) -> None:
    """Per-request generation settings are not supported in --requests: they fail in one line, not silently."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"image": str(images["wide"]), "prompt": "x", "max_new_tokens": 2}) + "\n")
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, "--requests", requests)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "unknown key 'max_new_tokens'" in err


# -- lmms-eval plugin -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(checkpoint: Path) -> DualTowerLMMS:
    """batch_size 8: larger than any request list below."""
    lmm = DualTowerLMMS.create_from_arg_string(f"pretrained={checkpoint},max_new_tokens=5", {"batch_size": "8"})
    wide, tall = sample_images()
    lmm.task_dict = {
        TASK: {
            SPLIT: [
                {"question": "Q0?\nOptions: A: red, B: blue", "images": [wide], "answer": "A"},
                {"question": "Q1?\nOptions: A: first, B: second", "images": [wide, tall], "answer": "B"},
            ]
        }
    }
    return lmm


def test_generate_until_matches_runner_with_until_and_multi_image(plugin: DualTowerLMMS) -> None:
    docs = plugin.task_dict[TASK][SPLIT]
    requests = [
        instance("generate_until", (mmstar.doc_to_text(doc["question"]), kwargs, doc_to_visual, i, TASK, SPLIT), i)
        for i, doc in enumerate(docs)
        for kwargs in ({"max_new_tokens": 6}, {"max_new_tokens": 2, "until": ["\n\n", "zz"]})
    ]
    answers = plugin.generate_until(requests)
    runner = plugin.runner
    prompts = [plugin._prompt(r.args[0], *r.args[2:6]) for r in requests]
    assert [len(p.images()) for p in prompts] == [1, 1, 2, 2]
    from dualtower.eval.runner import sampling_from_gen_kwargs

    for prompt, request, answer in zip(prompts, requests, answers, strict=True):
        sampling = sampling_from_gen_kwargs(request.args[1], plugin.max_new_tokens)
        result = runner.generator.generate_prepared([runner._prepared(prompt)], sampling)[0]
        assert answer == result.text
        assert len(result.token_ids) <= request.args[1]["max_new_tokens"]


def harness_split(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness `_encode_pair`: trailing spaces of the context move into the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids if text else []
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids) :]


@pytest.mark.parametrize(
    ("prefix", "continuation"),
    [("Answer:", " A"), ("Answer: ", "A"), ("Answer:", "A"), ("", " B"), ("", "Hello 日本")],
)
def test_loglikelihood_boundaries_match_the_model_logits(plugin, tokenizer, prefix, continuation) -> None:
    runner = plugin.runner
    wide, _ = sample_images()
    (logprob, greedy), = runner.loglikelihood([(EvalPrompt([wide], "What is it?", prefix), continuation)])
    context_ids, target_ids = harness_split(tokenizer, prefix, continuation)
    kept = tokenizer.decode(context_ids)
    target = tokenizer.decode(target_ids)
    expected, expected_greedy, _ = direct_logprobs(runner, [wide], "What is it?", kept, target)
    assert tokenizer(target, add_special_tokens=False).input_ids == target_ids
    assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_loglikelihood_merge_across_the_boundary_scores_the_separate_tokens(plugin, tokenizer) -> None:
    """"Answer" + "s" tokenizes jointly as "An" "swers", which does not start with the context's tokens: the
    runner then scores "s" tokenized alone after "Answer" (what harness's slicing would feed is not a
    tokenization of the text), so the figure is a real log-probability of the text."""
    runner = plugin.runner
    wide, _ = sample_images()
    assert tokenizer("Answers", add_special_tokens=False).input_ids[:1] != tokenizer("Answer").input_ids
    (logprob, greedy), = runner.loglikelihood([(EvalPrompt([wide], "What is it?", "Answer"), "s")])
    expected, expected_greedy, _ = direct_logprobs(runner, [wide], "What is it?", "Answer", "s")
    assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_plugin_loglikelihood_mmstar_prefix_and_batches(plugin: DualTowerLMMS) -> None:
    """Through the plugin, the mmstar assistant prefix "Answer:" precedes the continuation; 3 requests < batch."""
    docs = plugin.task_dict[TASK][SPLIT]
    context = mmstar.doc_to_text(docs[1]["question"])
    requests = [
        instance("loglikelihood", (context, " B", doc_to_visual, 1, TASK, SPLIT), 1),
        instance("loglikelihood", (context, lambda doc: " " + doc["answer"], doc_to_visual, 1, TASK, SPLIT), 1),
        instance("loglikelihood", ("Say it.", " Hi")),
    ]
    results = plugin.loglikelihood(requests)
    assert results[0] == pytest.approx(results[1])
    wide, tall = sample_images()
    user = "Q1?\nChoices: A: first, B: second\nAnswer with the letter directly"
    want = direct_logprobs(plugin.runner, [wide, tall], user, "Answer:", " B")
    assert results[0][0] == pytest.approx(want[0], abs=1e-4) and results[0][1] == want[1]
    assert results[2][0] == pytest.approx(direct_logprobs(plugin.runner, [], "Say it.", "", " Hi")[0], abs=1e-4)


def test_simple_evaluate_matches_the_offline_scorer(plugin: DualTowerLMMS, tmp_path: Path) -> None:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet
    from dualtower.eval.offline import run_offline_mmstar

    parquet = build_mmstar_parquet(tmp_path / "mmstar.parquet", 5)
    write_task(tmp_path, parquet)
    # Named as lmms-eval's own task, whose name picks the multiple-choice formatting (prompts.TASK_FORMATS).
    yaml = tmp_path / "mmstar_synthetic.yaml"
    yaml.write_text(yaml.read_text().replace("task: mmstar_synthetic", "task: mmstar"))
    manager = TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False, model_name="dualtower")
    cli_args = argparse.Namespace(process_with_media=True, reasoning_tags="[]", agentic_trace_mode="basic")
    lmm = DualTowerLMMS(plugin.runner)  # the runner's batch_size (8) exceeds the 5 requests
    results = evaluator.simple_evaluate(
        model=lmm, tasks=["mmstar"], task_manager=manager, log_samples=True, cli_args=cli_args,
        gen_kwargs="max_new_tokens=4", verbosity="WARNING",
    )  # fmt: skip
    samples = sorted(results["samples"]["mmstar"], key=lambda s: s["doc"]["index"])
    offline, path = run_offline_mmstar(
        plugin.runner, parquet, tmp_path / "offline.json", gen_kwargs={"max_new_tokens": 4}, log_samples=True
    )
    written = json.loads(path.read_text())
    records = [json.loads(line) for line in path.with_name("offline_samples.jsonl").read_text().splitlines()]
    assert [s["filtered_resps"][0].strip() for s in samples] == [r["prediction"] for r in records]
    metrics = results["results"]["mmstar"]
    assert written["results"]["average"] == pytest.approx(metrics["average,none"])
    assert written["results"] == offline["results"]


def test_eval_batches_do_not_share_sampling_noise(plugin: DualTowerLMMS) -> None:
    """A seeded sampled run in batches of one: the same prompt in two batches must not draw the same noise
    (one seed per batch, as the CLI derives them), while the run as a whole stays reproducible."""
    from dualtower.eval.runner import EvalModel, sampling_from_gen_kwargs

    base = plugin.runner
    runner = EvalModel(base.model, base.tokenizer, batch_size=1, seed=5)
    wide, _ = sample_images()
    prompts = [EvalPrompt([wide], "Describe it.")] * 2
    sampling = sampling_from_gen_kwargs({"temperature": 2.0, "top_k": 0, "max_new_tokens": 6}, seed=runner.seed)
    first = runner.generate(prompts, sampling)
    assert first[0] != first[1]
    assert runner.generate(prompts, sampling) == first
    # The first batch keeps the seed itself: a single batch matches the Generator called with that seed.
    alone = runner.generator.generate_prepared([runner._prepared(prompts[0])], sampling)[0].text
    assert first[0] == alone


def test_lmms_multiple_choice_requests_score_like_the_runner(plugin: DualTowerLMMS, tmp_path: Path) -> None:
    """lmms-eval's own multiple_choice requests (context, " " + choice, doc_to_visual, doc_id, task, split) reach
    the model as the mmstar prompt + "Answer:" + " X". (lmms-eval 0.7.3's simple_evaluate turns every
    loglikelihood response into a string before scoring, so the requests are built and answered here.)"""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet
    from dualtower.eval.offline import read_parquet_rows, row_prompt

    parquet = build_mmstar_parquet(tmp_path / "mmstar.parquet", 3)
    (tmp_path / "utils.py").write_text("from lmms_eval.tasks.mmstar.utils import *  # noqa: F403\n")
    (tmp_path / "mmstar_mc.yaml").write_text(
        f"task: mmstar\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    val: {parquet}\n"
        "test_split: val\noutput_type: multiple_choice\n"
        "doc_to_visual: !function utils.mmstar_doc_to_visual\ndoc_to_text: !function utils.mmstar_doc_to_text\n"
        'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n'
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n"
        '    post_prompt: "\\nAnswer with the option\'s letter from the given choices directly"\n'
    )
    manager = TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False, model_name="dualtower")
    task = get_task_dict(["mmstar"], manager)["mmstar"]
    task.build_all_requests()
    requests = sorted(task.instances, key=lambda r: (r.doc_id, r.idx))
    lmm = DualTowerLMMS(plugin.runner)
    lmm.task_dict = {"mmstar": task.dataset}
    got = lmm.loglikelihood(requests)
    rows = read_parquet_rows(parquet)
    expected = plugin.runner.loglikelihood([(row_prompt(row), f" {letter}") for row in rows for letter in "ABCD"])
    assert len(got) == 12
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]


def test_evaluate_cli_results_json_matches_offline_json(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """`python -m dualtower.evaluate` through lmms-eval and with --offline-parquet, on the same parquet and flags."""
    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet
    from dualtower.evaluate import main as evaluate

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    parquet = build_mmstar_parquet(tmp_path / "mmstar.parquet", 5)
    write_task(tasks, parquet)
    yaml = tasks / "mmstar_synthetic.yaml"
    yaml.write_text(yaml.read_text().replace("task: mmstar_synthetic", "task: mmstar"))
    common = ["--model", str(checkpoint), "--device", "cpu", "--batch_size", "8", "--limit", "4", "--log_samples",
              "--gen_kwargs", "max_new_tokens=3", "--verbosity", "WARNING"]  # fmt: skip
    lmms_out, offline_out = tmp_path / "lmms", tmp_path / "offline.json"
    assert evaluate([*common, "--tasks", "mmstar", "--include_path", str(tasks), "--output_path", str(lmms_out),
                     "--process_with_media"]) == 0  # fmt: skip
    assert evaluate([*common, "--offline-parquet", str(parquet), "--output_path", str(offline_out)]) == 0
    capsys.readouterr()
    (results_file,) = lmms_out.glob("*/*_results.json")
    lmms_results = json.loads(results_file.read_text())["results"]["mmstar"]
    offline = json.loads(offline_out.read_text())
    assert offline["num_samples"] == 4
    assert offline["results"]["average"] == pytest.approx(lmms_results["average,none"])
    (samples_file,) = lmms_out.glob("*/*_samples_mmstar.jsonl")
    lmms_samples = sorted(map(json.loads, samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    offline_samples = map(json.loads, offline_out.with_name("offline_samples.jsonl").read_text().splitlines())
    # The samples file holds each filtered response as the string itself.
    assert [s["filtered_resps"].strip() for s in lmms_samples] == [s["prediction"] for s in offline_samples]
