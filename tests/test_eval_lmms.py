"""The lmms-eval plugin driven by lmms-eval's own objects: Instance requests, the model registry, the CLI's
plugin discovery and a full `simple_evaluate` run on a local synthetic MMStar parquet (all offline, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra")

from lmms_eval.api.instance import Instance
from test_eval_runner import direct_logprobs, make_checkpoint, sample_images

from dualtower.eval import mmstar
from dualtower.eval.lmms_plugin import DualTowerLMMS
from dualtower.eval.offline import score_predictions
from dualtower.eval.runner import EvalModel, EvalPrompt
from dualtower.generation.sampling import batch_seed

TASK, SPLIT = "mmstar", "val"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("debug_checkpoint"))


@pytest.fixture(scope="module")
def plugin(checkpoint: Path) -> DualTowerLMMS:
    # lmms-eval's own construction path: model_args string + additional config (batch_size arrives as text).
    lmm = DualTowerLMMS.create_from_arg_string(
        f"pretrained={checkpoint},max_new_tokens=4,seed=7", {"batch_size": "2", "device": "cpu", "max_batch_size": None}
    )
    wide, tall = sample_images()
    docs = [
        {"question": "What color is the shape?\nOptions: A: red, B: blue", "images": [wide], "answer": "A"},
        {"question": "Which image is taller?\nOptions: A: first, B: second", "images": [wide, tall], "answer": "B"},
        {"question": "How many shapes?\nOptions: A: 1, B: 2", "images": [tall], "answer": "A"},
    ]
    lmm.task_dict = {TASK: {SPLIT: docs}, "ocrbench": {SPLIT: docs}}
    return lmm


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return doc["images"]


def instance(kind: str, arguments: tuple, doc_id: int = 0, task: str = TASK) -> Instance:
    return Instance(
        request_type=kind, arguments=arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1}
    )


def gen_request(doc_id: int, gen_kwargs: dict[str, Any], task: str = TASK) -> Instance:
    context = mmstar.doc_to_text(f"question {doc_id}")
    return instance("generate_until", (context, gen_kwargs, doc_to_visual, doc_id, task, SPLIT), doc_id, task)


def test_plugin_is_configured_from_model_args(plugin: DualTowerLMMS):
    assert plugin.batch_size == 2 and plugin.max_new_tokens == 4 and plugin.seed == 7
    assert str(plugin.device) == "cpu" and plugin.rank == 0 and plugin.world_size == 1


def test_generate_until_groups_by_gen_kwargs(plugin: DualTowerLMMS, monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[int, Any]] = []
    original = plugin.runner.generator.generate_prepared

    def recording(prompts, sampling, **kwargs):
        calls.append((len(prompts), sampling))
        return original(prompts, sampling, **kwargs)

    monkeypatch.setattr(plugin.runner.generator, "generate_prepared", recording)
    greedy = {"until": ["\n\n"], "do_sample": False}
    sampled = {"until": ["<stop>"], "max_new_tokens": 3, "temperature": 0.8, "top_p": 0.9, "top_k": 20}
    requests = [gen_request(0, greedy), gen_request(1, sampled), gen_request(2, greedy), gen_request(1, greedy)]
    answers = plugin.generate_until(requests)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    configs = {(c.max_new_tokens, c.do_sample, c.temperature, c.top_p, c.top_k, c.stop_strings) for _, c in calls}
    assert configs == {(4, False, 1.0, 1.0, 50, ("\n\n",)), (3, True, 0.8, 0.9, 20, ("<stop>",))}
    assert sorted(n for n, _ in calls) == [1, 1, 2]  # greedy: 3 requests in batches of 2; sampled: 1
    # Answers come back in request order: each greedy answer equals the runner's answer to the same prompt.
    runner_answers = plugin.runner.generate([plugin._prompt(*r.args[:1], *r.args[2:6]) for r in requests], calls[0][1])
    assert [answers[i] for i in (0, 2, 3)] == [runner_answers[i] for i in (0, 2, 3)]


def test_generate_until_groups_draw_their_own_noise(plugin: DualTowerLMMS, monkeypatch: pytest.MonkeyPatch):
    """Two groups that differ only in a stop string never produced: seeded, they must not share their noise."""
    seeds: list[int | None] = []
    original = plugin.runner.generator.generate_prepared

    def recording(prompts, sampling, **kwargs):
        seeds.append(sampling.seed)
        return original(prompts, sampling, **kwargs)

    monkeypatch.setattr(plugin.runner.generator, "generate_prepared", recording)
    hot = {"max_new_tokens": 6, "temperature": 2.0, "top_k": 0}
    requests = [gen_request(0, {**hot, "until": ["<never>"]}), gen_request(0, {**hot, "until": ["<never either>"]})]
    first = plugin.generate_until(requests)
    assert len(set(seeds)) == 2 and first[0] != first[1]
    assert plugin.generate_until(requests) == first  # still reproducible


def test_a_ready_eval_model_keeps_its_seed_and_batch_size(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """`DualTowerLMMS(pretrained=EvalModel(...))` samples with the runner's seed, as the offline evaluation does."""
    runner = EvalModel.from_pretrained(checkpoint, device="cpu", batch_size=3, seed=11)
    lmm = DualTowerLMMS(pretrained=runner, max_new_tokens=2)
    assert lmm.runner is runner and lmm.seed == 11 and lmm.batch_size == 3
    seeds: list[int | None] = []
    original = runner.generator.generate_prepared

    def recording(prompts, sampling, **kwargs):
        seeds.append(sampling.seed)
        return original(prompts, sampling, **kwargs)

    monkeypatch.setattr(runner.generator, "generate_prepared", recording)
    lmm.task_dict = {TASK: {SPLIT: [{"images": sample_images()[:1]}]}}
    lmm.generate_until([gen_request(0, {"temperature": 1.0, "top_k": 0})])
    assert seeds == [batch_seed(batch_seed(11, 0), 0)]  # group 0, batch 0
    assert DualTowerLMMS(pretrained=runner, seed=5).seed == 5  # an explicit plugin seed wins


def test_generate_until_honours_until(plugin: DualTowerLMMS):
    free = plugin.generate_until([gen_request(0, {"max_new_tokens": 6})])[0]
    stop = next(free[i : i + 2] for i in range(1, len(free) - 1) if free.find(free[i : i + 2]) == i)
    cut = plugin.generate_until([gen_request(0, {"max_new_tokens": 6, "until": [stop]})])[0]
    assert cut == free[: free.find(stop)]


def test_mmstar_formatting_reaches_the_model(plugin: DualTowerLMMS):
    prompt = plugin._prompt(mmstar.doc_to_text("Q?\nOptions: A: x, B: y"), doc_to_visual, 1, TASK, SPLIT)
    assert (
        prompt.text == "Q?\nChoices: A: x, B: y\nAnswer with the letter directly"
        and prompt.assistant_prefix == "Answer:"
    )
    assert len(prompt.images()) == 2
    ocr = plugin._prompt("Read it.", doc_to_visual, 0, "ocrbench", SPLIT)
    assert ocr.text == "Read it.\nGive a very brief answer." and ocr.assistant_prefix == ""


def test_loglikelihood_equals_direct_forward(plugin: DualTowerLMMS):
    context = mmstar.doc_to_text("What color is the shape?\nOptions: A: red, B: blue")
    requests = [
        instance("loglikelihood", (context, " A", doc_to_visual, 0, TASK, SPLIT)),
        instance("loglikelihood", (context, lambda doc: " " + doc["answer"], doc_to_visual, 1, TASK, SPLIT), 1),
        instance("loglikelihood", ("Say something.", "Hello world")),  # unconditional: no images, no task
    ]
    results = plugin.loglikelihood(requests)
    runner = plugin.runner
    wide, tall = sample_images()
    user_text = "What color is the shape?\nChoices: A: red, B: blue\nAnswer with the letter directly"
    expected = [
        direct_logprobs(runner, [wide], user_text, "Answer:", " A"),
        direct_logprobs(runner, [wide, tall], user_text, "Answer:", " B"),
        direct_logprobs(runner, [], "Say something.", "", "Hello world"),
    ]
    for (logprob, is_greedy), (want, want_greedy, _) in zip(results, expected, strict=True):
        assert logprob == pytest.approx(want, abs=1e-4)
        assert is_greedy == want_greedy
    # The plugin adds nothing to the runner's figures: the same three requests give exactly the same results.
    # (The same batch: a batch of one instead packs other GEMM shapes, which may round differently.)
    same_batch = [
        (EvalPrompt([wide], user_text, "Answer:"), " A"),
        (EvalPrompt([wide, tall], user_text, "Answer:"), " B"),
        (EvalPrompt([], "Say something.", ""), "Hello world"),
    ]
    assert plugin.runner.loglikelihood(same_batch) == results


def test_generate_until_multi_round_is_unsupported(plugin: DualTowerLMMS):
    with pytest.raises(NotImplementedError):
        plugin.generate_until_multi_round([])


def test_model_registry_discovers_the_plugin(monkeypatch: pytest.MonkeyPatch):
    import lmms_eval.models as lmms_models
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from dualtower.eval.lmms_manifest import manifests

    registry = ModelRegistryV2()  # the entry-point payload, as lmms-eval registers it
    for manifest in manifests():
        registry.register_manifest(manifest)
    assert registry.get_model_class("dualtower") is DualTowerLMMS

    legacy = ModelRegistryV2()  # LMMS_EVAL_PLUGINS=dualtower.eval
    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "dualtower.eval")
    with pytest.warns(DeprecationWarning, match="LMMS_EVAL_PLUGINS"):
        lmms_models._merge_legacy_plugin_models(legacy)
    assert legacy.get_model_class("dualtower") is DualTowerLMMS
    assert importlib.util.find_spec("dualtower.eval.tasks").submodule_search_locations  # the CLI needs it


def write_task(directory: Path, parquet: Path) -> None:
    """An lmms-eval task over the local parquet with the `mmstar` task's own functions."""
    (directory / "utils.py").write_text("from lmms_eval.tasks.mmstar.utils import *  # noqa: F403\n")
    metrics = "".join(
        f"  - metric: {name}\n    aggregation: !function utils.mmstar_aggregate_results\n    higher_is_better: true\n"
        for name in ("coarse perception", "fine-grained perception", "average")
    )
    (directory / "mmstar_synthetic.yaml").write_text(
        f"task: mmstar_synthetic\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    val: {parquet}\n"
        "test_split: val\noutput_type: generate_until\n"
        "doc_to_visual: !function utils.mmstar_doc_to_visual\ndoc_to_text: !function utils.mmstar_doc_to_text\n"
        "doc_to_target: answer\nprocess_results: !function utils.mmstar_process_results\n"
        f"metric_list:\n{metrics}"
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n"
        '    post_prompt: "\\nAnswer with the option\'s letter from the given choices directly"\n'
    )


def test_simple_evaluate_end_to_end(plugin: DualTowerLMMS, tmp_path: Path):
    """lmms-eval builds the requests, calls the plugin, post-processes and aggregates with its MMStar code."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet

    write_task(tmp_path, build_mmstar_parquet(tmp_path / "mmstar.parquet", 4))
    manager = TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False, model_name="dualtower")
    cli_args = argparse.Namespace(process_with_media=True, reasoning_tags="[]", agentic_trace_mode="basic")
    lmm = DualTowerLMMS(plugin.runner)  # simple_evaluate ends with lm.clean(), which drops the model attribute
    results = evaluator.simple_evaluate(
        model=lmm, tasks=["mmstar_synthetic"], task_manager=manager, log_samples=True, cli_args=cli_args,
        gen_kwargs="max_new_tokens=3", verbosity="WARNING",
    )  # fmt: skip
    metrics = results["results"]["mmstar_synthetic"]
    samples = results["samples"]["mmstar_synthetic"]
    assert len(samples) == 4 and 0.0 <= metrics["average,none"] <= 1.0
    # Our scorer reproduces lmms-eval's on the same outputs.
    docs = [s["doc"] for s in samples]
    predictions = [s["filtered_resps"][0] for s in samples]
    ours = mmstar.score_rows(score_predictions(docs, predictions))
    assert ours["average"] == pytest.approx(metrics["average,none"])


def test_cli_runs_lmms_eval_tasks(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet
    from dualtower.evaluate import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, build_mmstar_parquet(tmp_path / "mmstar.parquet", 4))
    output = tmp_path / "results"
    code = main([
        "--model", str(checkpoint), "--tasks", "mmstar_synthetic", "--include_path", str(tasks), "--device", "cpu",
        "--batch_size", "2", "--limit", "3", "--gen_kwargs", "max_new_tokens=3", "--output_path", str(output),
        "--log_samples", "--process_with_media", "--verbosity", "WARNING",
    ])  # fmt: skip
    assert code == 0
    (results_file,) = output.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["mmstar_synthetic"]["average,none"] <= 1.0
    assert results["config"]["limit"] == 3.0
    (samples_file,) = output.glob("*/*_samples_mmstar_synthetic.jsonl")
    assert len(samples_file.read_text().splitlines()) == 3
    assert "mmstar_synthetic" in capsys.readouterr().out
