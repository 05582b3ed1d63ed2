"""`python -m dualtower.generate` and the tokenizer-to-text path of the Python API, on a random debug checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dualtower.generate import (
    build_parser,
    check_checkpoint,
    main,
    pair_requests,
    read_requests_file,
)
from dualtower.generation import GenerationRequest, Generator, SamplingConfig
from dualtower.generation.sampling import batch_seed
from dualtower.model import DualTowerVLM


@pytest.fixture(scope="module")
def tokenizer():
    from dualtower.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("checkpoint")
    DualTowerVLM.from_flavor("debug").save_pretrained(directory, tokenizer)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {"wide": folder / "wide.png", "square": folder / "square.png", "broken": folder / "broken.png"}
    Image.new("RGB", (300, 140), (200, 30, 40)).save(paths["wide"])
    Image.new("L", (90, 90), 128).save(paths["square"])
    paths["broken"].write_bytes(b"this is not an image")
    return paths


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_one_text_per_request_and_stats_on_stderr(capsys, checkpoint, images) -> None:
    code, out, err = run_main(
        capsys,
        *("--checkpoint", checkpoint, "--image", images["wide"], "--prompt", "What colour is it?"),
        *("--prompt", "Is it wide?", "--max_new_tokens", 4, "--stats"),
    )
    assert code == 0, err
    assert out.count("\n") == 2
    assert "stats:" in err and "hits=1 misses=1" in err  # the second question reused the image's K/V


def test_cli_requests_file_streaming_and_weights_file(capsys, tmp_path, checkpoint, images) -> None:
    requests = tmp_path / "requests.jsonl"
    lines = [{"image": str(images["square"]), "prompt": "Grey?"}, {"images": [], "prompt": "Hello"}]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    base = ("--requests", requests, "--max_new_tokens", 3)
    code, batched, err = run_main(capsys, "--checkpoint", checkpoint, *base)
    assert code == 0, err
    weights = ("--checkpoint", checkpoint / "model.safetensors", "--config", checkpoint / "config.json")
    code, streamed, err = run_main(capsys, *weights, *base, "--stream")
    assert code == 0, err
    assert streamed.count("\n") == batched.count("\n") == 2
    assert streamed == batched  # greedy: the same texts, printed the same way (stripped) with or without --stream


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("--image", "{square}", "--bogus"), 2, "unrecognized arguments"),
        (("--image", "{square}", "--top_p", "1.5"), 2, "--top_p"),
        (("--image", "{square}", "--jsonl", "--stream"), 2, "--jsonl cannot be combined with --stream"),
        (("--image", "{square}", "--stop", ""), 2, "--stop strings must be non-empty"),
        (
            (
                "--image",
                "{missing}",
            ),
            1,
            "image not found",
        ),
        (
            (
                "--image",
                "{broken}",
            ),
            1,
            "cannot decode image",
        ),
        (("--image", "{square}", "--image", "{wide}", "--prompt", "a", "--prompt", "b", "--prompt", "c"), 1, "pairs"),
    ],
)
def test_cli_errors_are_one_line(capsys, checkpoint, images, argv, code, message) -> None:
    paths = {**{k: str(v) for k, v in images.items()}, "missing": str(images["wide"].parent / "missing.png")}
    returned, out, err = run_main(capsys, "--checkpoint", checkpoint, *(a.format(**paths) for a in argv))
    assert returned == code
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


def test_cli_missing_checkpoint_in_a_subprocess(images, tmp_path) -> None:
    command = [sys.executable, "-m", "dualtower.generate", "--checkpoint", str(tmp_path / "nope"), "--image"]
    completed = subprocess.run([*command, str(images["wide"])], capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert completed.stdout == ""
    assert completed.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'nope'}"]


def test_pairing_rules() -> None:
    assert pair_requests(["a"], ["x", "y"]) == [(["a"], "x"), (["a"], "y")]
    assert pair_requests(["a", "b"], ["x"]) == [(["a"], "x"), (["b"], "x")]
    assert pair_requests(["a", "b"], ["x", "y"]) == [(["a"], "x"), (["b"], "y")]
    assert pair_requests([], ["x"]) == [([], "x")]
    assert pair_requests(["a"], []) == [(["a"], "Describe the image.")]


def test_python_api_from_images_and_text(checkpoint, images, tokenizer) -> None:
    model = DualTowerVLM.from_pretrained(checkpoint)
    requests = [
        GenerationRequest([str(images["wide"])], "Describe."),
        GenerationRequest([Image.open(images["square"]), str(images["wide"])], "Compare."),
        GenerationRequest([], "No image."),
    ]
    config = SamplingConfig(max_new_tokens=3)
    generator = Generator(model, tokenizer)
    results = generator.generate(requests, config)
    assert [len(r.token_ids) for r in results] == [3, 3, 3] or any(r.finish_reason == "eos" for r in results)
    assert all(r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results)
    assert generator.stats.prefix_cache_misses == 2 and generator.stats.vision_tower_runs == 1
    again = model.generate(requests[:1], tokenizer, config)
    assert again[0].token_ids == results[0].token_ids


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image_path": "a.png", "question": "What?"}', "line 2: unknown keys 'image_path', 'question'"),
        ('{"image": "a.png", "promt": "Count"}', "line 2: unknown key 'promt'"),
        ('{"image": "a.png", "images": ["b.png"]}', "line 2: give 'image' or 'images', not both"),
        ('{"image": "", "prompt": "x"}', "line 2: 'image' holds an empty image path"),
        ('{"images": ["a.png", " "]}', "line 2: 'images' holds an empty image path"),
        ("{}", "line 2: empty request"),
        ('["a.png"]', "line 2: expected a {image|images, prompt} object"),
    ],
)
def test_requests_file_rejects_unknown_keys_and_ambiguous_images(tmp_path, line: str, message: str) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"image": "a.png", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError) as error:
        read_requests_file(requests)
    assert str(error.value).startswith(f"{requests} {message}") and "\n" not in str(error.value)


def test_batch_seeds_are_distinct_and_deterministic() -> None:
    seeds = {batch_seed(seed, start) for seed in range(4) for start in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(0, 0) == 0 and batch_seed(5, 3) == batch_seed(5, 3) and batch_seed(None, 3) is None
    assert "one request at a time" in " ".join(build_parser().format_help().split())


def test_cli_stream_seeds_each_request_differently_and_jsonl(capsys, checkpoint, images) -> None:
    """--stream generates one request per batch: with one seed for every batch, equal requests got equal noise."""
    same_twice = ("--image", images["square"], "--prompt", "Grey?", "--prompt", "Grey?")
    sampling = ("--sampling", "--seed", 0, "--temperature", 1.5, "--top_k", 0, "--top_p", 1, "--max_new_tokens", 4)
    code, streamed, err = run_main(capsys, "--checkpoint", checkpoint, *same_twice, *sampling, "--stream")
    assert code == 0, err
    # The same batches (of one request) without streaming, as JSON lines: the same draws, the exact texts.
    one_by_one = ("--batch_size", 1, "--jsonl")
    code, records, err = run_main(capsys, "--checkpoint", checkpoint, *same_twice, *sampling, *one_by_one)
    assert code == 0, err
    rows = [json.loads(line) for line in records.splitlines()]
    assert [row["index"] for row in rows] == [0, 1]
    assert all(row["finish_reason"] in ("eos", "length", "stop") and 1 <= row["tokens"] <= 4 for row in rows)
    assert "".join(row["text"].strip() + "\n" for row in rows) == streamed  # streamed text is stripped too
    assert rows[0]["text"] != rows[1]["text"]


def test_requests_file_paths_are_relative_to_its_folder_and_blank_lines_are_skipped(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    requests = folder / "requests.jsonl"
    absolute = str(tmp_path / "elsewhere" / "c.png")
    lines = ['{"image": "a.png", "prompt": "x"}', "", "   ", json.dumps({"images": ["sub/b.png", absolute]})]
    requests.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # relative paths are not taken from the working directory
    assert read_requests_file(requests) == [
        ([str(folder / "a.png")], "x"),
        ([str(folder / "sub" / "b.png"), absolute], "Describe the image."),
    ]


def test_a_missing_local_checkpoint_fails_fast_but_a_hub_id_does_not(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for local in ("no-such-model", "runs/step_100/model", "./model", "model.safetensors"):
        with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {local}"):
            check_checkpoint(local, None)
    check_checkpoint("owner/name", None)  # may be a Hub repo id: left to the loader
    with pytest.raises(FileNotFoundError, match="config not found"):
        check_checkpoint("owner/name", "missing.json")


def test_requests_file_lines_end_only_at_newlines_and_a_bom_is_accepted(tmp_path) -> None:
    """JSON strings may hold U+2028, U+2029 and NEL unescaped (json.dumps(ensure_ascii=False) writes them so):
    str.splitlines() split such a request in two ('not valid JSON'). Editors on Windows write a UTF-8 BOM."""
    requests = tmp_path / "requests.jsonl"
    prompts = ["one\u2028two", "three\u2029four\x85five", "日本語 ✓"]
    body = "\r\n".join(json.dumps({"prompt": prompt}, ensure_ascii=False) for prompt in prompts) + "\r\n"
    requests.write_bytes("\ufeff".encode() + body.encode("utf-8"))
    assert read_requests_file(requests) == [([], prompt) for prompt in prompts]


def test_a_requests_file_that_is_not_utf8_names_the_file_and_line(tmp_path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r"requests\.jsonl line 2: not UTF-8 text \(invalid continuation byte"):
        read_requests_file(requests)


def test_a_hub_checkpoint_is_downloaded_once_and_its_tokenizer_used(capsys, checkpoint, images, monkeypatch) -> None:
    """DESIGN.md section 6: the tokenizer comes from the checkpoint's own folder first, for a Hub id too."""
    import huggingface_hub

    from dualtower import tokenizer as tokenizer_module

    downloads, tokenizer_dirs = [], []
    real_load_tokenizer = tokenizer_module.load_tokenizer

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        downloads.append(repo_id)
        return str(checkpoint)

    def recording_load_tokenizer(checkpoint_dir=None, tokenizer_id=tokenizer_module.DEFAULT_TOKENIZER_ID):
        tokenizer_dirs.append(checkpoint_dir)
        return real_load_tokenizer(checkpoint_dir, tokenizer_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", recording_load_tokenizer)
    code, out, err = run_main(
        capsys, "--checkpoint", "someone/dualtower-debug", "--image", images["square"], "--prompt", "Hi?",
        "--max_new_tokens", 2, "--device", "cpu",
    )
    assert code == 0 and out.count("\n") == 1, err
    assert downloads == ["someone/dualtower-debug"]
    assert [Path(d).resolve() for d in tokenizer_dirs] == [checkpoint.resolve()]


def test_cli_stream_prints_the_same_stripped_text_as_plain_output(capsys, checkpoint, images, monkeypatch) -> None:
    """Plain output prints each text stripped (as the original generate.py); --stream printed the raw deltas, so
    the same answer came out with its leading space and trailing newlines only when streamed."""
    from dualtower import generation
    from dualtower.generation import GenerationResult

    deltas = [" ", "\n A", " b", " ", "\n\n", " c", "  ", "\n"]

    class ScriptedGenerator:
        def __init__(self, model, tokenizer, **kwargs) -> None:
            self.stats = None

        def generate(self, batch, sampling, on_text=None):
            if on_text is not None:
                for delta in deltas:
                    on_text(0, delta)
            return [GenerationResult("".join(deltas), [5] * len(deltas), "length") for _ in batch]

    monkeypatch.setattr(generation, "Generator", ScriptedGenerator)
    argv = ("--checkpoint", checkpoint, "--image", images["square"], "--prompt", "a", "--prompt", "b")
    code, plain, err = run_main(capsys, *argv)
    assert code == 0, err
    assert plain == "A b \n\n c\n" * 2
    code, streamed, err = run_main(capsys, *argv, "--stream")
    assert code == 0, err
    assert streamed == plain
