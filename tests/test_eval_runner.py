"""The evaluation runner on a random debug checkpoint: log-likelihood against a direct forward pass, batched
generation, the offline MMStar CLI run and the wrappers (no lmms-eval needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dualtower.batch import IGNORE_INDEX
from dualtower.data.collate import collate
from dualtower.data.document import Document, document_from_prompt
from dualtower.data.images import ImageProcessor
from dualtower.eval import mmstar
from dualtower.eval.runner import EvalModel, EvalPrompt, sampling_from_gen_kwargs
from dualtower.model import DualTowerVLM
from dualtower.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(directory: Path) -> Path:
    """A random debug DualTowerVLM saved with its tokenizer (seeded: the same bytes every run)."""
    torch.manual_seed(1234)
    model = DualTowerVLM.from_flavor("debug")
    return model.save_pretrained(directory, tokenizer=load_tokenizer())


def sample_images() -> tuple[Image.Image, Image.Image]:
    """Two 2:1 images: 1x2 and 2x1 grids of the debug model's 128-pixel tiles, plus a global tile each."""
    wide = Image.new("RGB", (200, 100), (220, 30, 30))
    tall = Image.new("RGB", (60, 120), (40, 70, 220))
    return wide, tall


def direct_logprobs(runner: EvalModel, images: list, user_text: str, prefix: str, continuation: str):
    """Oracle: one document, one forward pass, log-softmax over every text row, continuation rows picked.

    Returns (sum of log-probs, every continuation token is the argmax, argmax token at the first row).
    """
    model, tokenizer = runner.model, runner.tokenizer
    document = document_from_prompt(images, user_text, ImageProcessor(model.cfg), tokenizer, model.cfg)
    context = document.input_ids.tolist() + tokenizer(prefix, add_special_tokens=False).input_ids
    target = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor(context + target)
    single = Document(ids, torch.full_like(ids, IGNORE_INDEX), document.tiles, document.prefix_len)
    with torch.no_grad():
        hidden = model(collate([single], model.cfg.image_token_id))  # text rows: positions prefix_len ..
        logprobs = model.logits(hidden).float().log_softmax(dim=-1)
    rows = torch.arange(len(target)) + len(context) - 1 - document.prefix_len  # row predicting each target
    picked = logprobs[rows, torch.tensor(target)]
    greedy = logprobs[rows].argmax(dim=-1) == torch.tensor(target)
    return picked.sum().item(), bool(greedy.all()), int(logprobs[rows[0]].argmax())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("debug_checkpoint"))


@pytest.fixture(scope="module")
def runner(checkpoint: Path) -> EvalModel:
    return EvalModel.from_pretrained(checkpoint, device="cpu", batch_size=3)


def test_checkpoint_loads_with_its_tokenizer(runner: EvalModel, checkpoint: Path):
    assert (checkpoint / "tokenizer.json").is_file()
    assert runner.model.cfg.vision.image_size == 128 and runner.device.type == "cpu"
    assert runner.tokenizer.convert_tokens_to_ids("<|image|>") == runner.model.cfg.image_token_id


def test_loglikelihood_equals_sum_of_direct_forward_logprobs(runner: EvalModel, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("dualtower.eval.runner.MAX_TILES_PER_FORWARD", 4)  # forwards of 3 + 0 tiles, 6, then 3
    wide, tall = sample_images()
    cases = [
        ([wide], "What color is the shape?\nChoices: A: red, B: blue", "Answer:", " A"),
        ([], "Say hello.", "", "Hello there, friend"),
        ([wide, tall], "Which image is taller?", "", "the second one"),
        ([tall], "Count the shapes.", "", "3"),
    ]
    requests = [(EvalPrompt(images, text, prefix), cont) for images, text, prefix, cont in cases]
    results = runner.loglikelihood(requests)
    for (images, text, prefix, cont), (logprob, is_greedy) in zip(cases, results, strict=True):
        expected, expected_greedy, _ = direct_logprobs(runner, images, text, prefix, cont)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert is_greedy == expected_greedy
        assert logprob < 0
    assert runner.loglikelihood([(requests[0][0], "")]) == [(0.0, True)]


def test_is_greedy_for_the_argmax_continuation(runner: EvalModel):
    wide, _ = sample_images()
    _, _, argmax = direct_logprobs(runner, [wide], "Describe the image.", "", "x")
    continuation = runner.tokenizer.decode([argmax])
    assert runner.tokenizer(continuation, add_special_tokens=False).input_ids == [argmax]
    logprob, is_greedy = runner.loglikelihood([(EvalPrompt([wide], "Describe the image."), continuation)])[0]
    assert is_greedy
    assert logprob == pytest.approx(direct_logprobs(runner, [wide], "Describe the image.", "", continuation)[0])


def test_bf16_checkpoint_scores_like_fp32(runner: EvalModel, checkpoint: Path):
    # bf16 weights and activations with an fp32 head and log-softmax: a few 1e-4 apart on this model.
    bf16 = EvalModel.from_pretrained(checkpoint, device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    wide, _ = sample_images()
    requests = [(EvalPrompt([wide], "What color?", "Answer:"), " A red square"), (EvalPrompt([], "Hi"), "Hello")]
    for (want, _), (got, _) in zip(runner.loglikelihood(requests), bf16.loglikelihood(requests), strict=True):
        assert got == pytest.approx(want, abs=5e-3)


def test_generation_is_independent_of_batching_and_order(runner: EvalModel):
    wide, tall = sample_images()
    prompts = [
        EvalPrompt([wide], "What color is the shape?", "Answer:"),
        EvalPrompt([], "Hi"),
        EvalPrompt(lambda: [wide, tall], "Which image has more shapes? Think about both images carefully."),
    ]
    sampling = sampling_from_gen_kwargs({"max_new_tokens": 4})
    batched = runner.generate(prompts, sampling)
    one_by_one = [runner.generate([p], sampling)[0] for p in prompts]
    assert batched == one_by_one
    assert all(isinstance(text, str) and text for text in batched)


def test_prefix_cache_keys_hash_the_images_not_their_tiles(runner: EvalModel, monkeypatch: pytest.MonkeyPatch):
    """Up to 17 fp32 tiles per prompt would be hashed otherwise; the same image still hits the cache."""
    from dualtower.generation import requests

    hashed_shapes: list[tuple[int, ...]] = []
    real_digest = requests.tensor_digest

    def recording_digest(tensor: torch.Tensor) -> str:
        hashed_shapes.append(tuple(tensor.shape))
        return real_digest(tensor)

    monkeypatch.setattr(requests, "tensor_digest", recording_digest)
    image = Image.new("RGB", (90, 150), (10, 200, 90))  # no other test uses it: the first call misses
    sampling = sampling_from_gen_kwargs({"max_new_tokens": 2})
    stats = runner.generator.prefix_cache.stats
    hits_before, misses_before = stats.hits, stats.misses
    first = runner.generate([EvalPrompt([image], "What color is it?")], sampling)
    again = runner.generate([EvalPrompt([image.copy()], "What color is it?")], sampling)
    assert first == again
    assert (stats.hits, stats.misses) == (hits_before + 1, misses_before + 1)
    assert hashed_shapes and all(len(shape) == 1 for shape in hashed_shapes)  # prefix ids only


def run_cli(args: list[str]) -> None:
    from dualtower.evaluate import main

    assert main(args) == 0


def test_offline_mmstar_run_writes_results(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet

    parquet = build_mmstar_parquet(tmp_path / "mmstar.parquet", 6)
    output = tmp_path / "out" / "mmstar.json"
    run_cli([
        "--model", str(checkpoint), "--offline-parquet", str(parquet), "--output_path", str(output),
        "--limit", "5", "--batch_size", "2", "--device", "cpu", "--log_samples",
        "--gen_kwargs", "max_new_tokens=3",
    ])  # fmt: skip
    document = json.loads(output.read_text())
    assert document["num_samples"] == 5 and document["task"] == "mmstar"
    assert document["config"]["gen_kwargs"] == {"until": ["\n\n"], "do_sample": False, "max_new_tokens": 3}
    samples = [json.loads(line) for line in output.with_name("mmstar_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5
    assert sum(document["results"]["counts"].values()) == 5
    rescored = mmstar.score_rows(samples)
    assert document["results"]["average"] == pytest.approx(rescored["average"])
    for sample in samples:
        assert sample["extracted"] == mmstar.extract_letter(sample["prediction"])
        assert sample["score"] == float(sample["extracted"] == sample["answer"])
    assert "average" in capsys.readouterr().out


def test_an_undecodable_image_scores_its_row_0_and_the_others_are_generated(caplog) -> None:
    import io
    from types import SimpleNamespace

    from dualtower.eval.offline import evaluate_mmstar_rows

    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(encoded, format="PNG")
    good = {"bytes": encoded.getvalue(), "path": None}
    broken = {"bytes": encoded.getvalue()[:20], "path": None}  # a cut file
    rows = [
        {"index": i, "question": f"Q{i}?\nOptions: A: x, B: y", "image": image, "answer": "A",
         "category": "c", "l2_category": "l"}
        for i, image in enumerate([good, broken, [good, broken], good])
    ]  # fmt: skip
    asked = []

    def generate(prompts, sampling):
        asked.extend(prompt.text for prompt in prompts)
        return ["A"] * len(prompts)

    runner = SimpleNamespace(seed=0, generate=generate)
    with caplog.at_level("WARNING", logger="dualtower.eval.offline"):
        results, samples = evaluate_mmstar_rows(runner, rows)
    assert [("Q0?" in text, "Q3?" in text) for text in asked] == [(True, False), (False, True)]
    assert [s["score"] for s in samples] == [1.0, 0.0, 0.0, 1.0]
    assert ["error" in s for s in samples] == [False, True, True, False]
    assert samples[1]["error"].startswith("cannot decode image")
    assert results["unreadable_images"] == 2 and results["average"] == 0.5
    assert "MMStar row 1: cannot decode image" in caplog.text and "MMStar row 2" in caplog.text


def test_missing_lmms_eval_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    from dualtower.evaluate import import_lmms_eval

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval` fail
    with pytest.raises(SystemExit, match=r"pip install 'dualtower\[eval\]'"):
        import_lmms_eval()


def test_evaluate_sh_passes_env_overrides(tmp_path: Path):
    fake_python = tmp_path / "fake_python"
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python)}
    default = subprocess.run(["bash", "evaluate.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split("\n")[:10] == [
        "-m", "dualtower.evaluate", "--model", "patrickamadeus/dualtower-cauldron", "--tasks", "mmstar",
        "--batch_size", "32", "--output_path", "eval_results",
    ]  # fmt: skip
    env.update(CHECKPOINT="ckpt", TASKS="ai2d,mmstar", BATCH_SIZE="8", DEVICE="cpu")
    custom = subprocess.run(
        ["bash", "evaluate.sh", "--limit", "3"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    words = custom.stdout.split()
    assert words[words.index("--model") + 1] == "ckpt" and words[words.index("--tasks") + 1] == "ai2d,mmstar"
    assert words[words.index("--batch_size") + 1] == "8" and words[words.index("--device") + 1] == "cpu"
    assert "--process_with_media" in words and words[-2:] == ["--limit", "3"]


def test_evaluation_py_is_the_cli():
    result = subprocess.run([sys.executable, "evaluation.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--offline-parquet" in result.stdout and "--process_with_media" in result.stdout


def test_long_answer_requests_are_capped_to_the_positions(runner: EvalModel, monkeypatch, caplog):
    """Many lmms-eval tasks ask for 8k-49k new tokens: generation stops at the model's last position (with a
    warning) instead of failing the run; a prompt that fills every position is an error."""
    prompt = EvalPrompt([], "Hi")
    length = runner._prepared(prompt).input_ids.numel()
    monkeypatch.setattr(runner.cfg.lm, "max_position_embeddings", length + 3)
    capped = runner.generate([prompt], sampling_from_gen_kwargs({"max_new_tokens": 8192}))
    assert "max_new_tokens 8192 capped to 3" in caplog.text
    assert capped == runner.generate([prompt], sampling_from_gen_kwargs({"max_new_tokens": 3}))
    monkeypatch.setattr(runner.cfg.lm, "max_position_embeddings", length)
    with pytest.raises(ValueError, match="fills all"):
        runner.generate([prompt], sampling_from_gen_kwargs({"max_new_tokens": 4}))


def continuation_ids(document: Document) -> list[int]:
    """The supervised label ids of a scoring document, i.e. the continuation's tokens."""
    return document.labels[document.labels != IGNORE_INDEX].tolist()


def test_max_new_tokens_cap_uses_the_longest_prompt_of_the_batch(runner: EvalModel, monkeypatch, caplog):
    short, long = EvalPrompt([], "Hi"), EvalPrompt([], "Please tell me a long story about a brave dragon and a knight.")
    short_len, long_len = (runner._prepared(p).input_ids.numel() for p in (short, long))
    assert long_len >= short_len + 5  # clearly different lengths, one batch (batch_size 3)
    monkeypatch.setattr(runner.cfg.lm, "max_position_embeddings", long_len + 3)
    capped = runner.generate([short, long], sampling_from_gen_kwargs({"max_new_tokens": 8192}))
    assert "max_new_tokens 8192 capped to 3:" in caplog.text
    assert capped == runner.generate([short, long], sampling_from_gen_kwargs({"max_new_tokens": 3}))


def test_is_greedy_is_false_when_a_later_token_is_not_the_argmax(runner: EvalModel):
    text = "Describe a red square."
    _, _, first = direct_logprobs(runner, [], text, "", "x")
    first_text = runner.tokenizer.decode([first])
    assert runner.encode(first_text) == [first]
    _, _, second = direct_logprobs(runner, [], text, first_text, "x")  # the argmax after `first`
    # A second token that is not the argmax and that the joint tokenization keeps as [first, other].
    others = [runner.encode(word)[0] for word in (" the", " and", ".", " cat", " of")]
    decode = runner.tokenizer.decode
    other = next(t for t in others if t != second and runner.encode(first_text + decode([t])) == [first, t])
    continuation = decode([first, other])
    assert continuation_ids(runner.scoring_document(EvalPrompt([], text), continuation)) == [first, other]
    (logprob, is_greedy), (_, first_greedy) = runner.loglikelihood(
        [(EvalPrompt([], text), continuation), (EvalPrompt([], text), first_text)]
    )
    assert first_greedy is True and is_greedy is False
    expected, expected_greedy, _ = direct_logprobs(runner, [], text, "", continuation)
    assert expected_greedy is False
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_trailing_whitespace_of_the_assistant_prefix_moves_into_the_continuation(runner: EvalModel):
    """lm-eval's rule: context "Answer: " + "A" is scored as "Answer:" + " A" (the space token or a merged " A")."""
    prompt = EvalPrompt([], "What color is the shape?\nChoices: A: red, B: blue", "Answer: ")
    expected_ids = runner.encode("Answer: A")[len(runner.encode("Answer:")) :]
    assert expected_ids == runner.encode(" A") != runner.encode("A")
    document = runner.scoring_document(prompt, "A")
    assert continuation_ids(document) == expected_ids
    context = runner.prompt_document(EvalPrompt([], prompt.text, "Answer:")).input_ids.tolist()
    assert document.input_ids.tolist() == context + expected_ids
    ((logprob, _),) = runner.loglikelihood([(prompt, "A")])
    assert logprob == pytest.approx(direct_logprobs(runner, [], prompt.text, "Answer:", " A")[0], abs=1e-4)


def test_continuation_tokens_come_from_the_joint_tokenization(runner: EvalModel):
    """After "...", the byte-level regex glues "'" to the punctuation run: "'m" is scored as "'" + "m", the
    tokens a model reading "Answer: ...'m" sees, not the separate tokenization's single "'m" token."""
    prefix, continuation = "Answer: ...", "'m"
    context_ids, whole = runner.encode(prefix), runner.encode(prefix + continuation)
    assert whole[: len(context_ids)] == context_ids
    joint = whole[len(context_ids) :]
    assert joint == runner.encode("'") + runner.encode("m") and joint != runner.encode(continuation)
    document = runner.scoring_document(EvalPrompt([], "Hi", prefix), continuation)
    assert continuation_ids(document) == joint
    context = runner.prompt_document(EvalPrompt([], "Hi", prefix)).input_ids.tolist()
    assert document.input_ids.tolist() == context + joint
