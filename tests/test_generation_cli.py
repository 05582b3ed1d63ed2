"""`python -m dualtower.generate` and the tokenizer-to-text path of the Python API, on a random debug checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dualtower.generate import main, pair_requests
from dualtower.generation import GenerationRequest, Generator, SamplingConfig
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


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("--image", "{square}", "--bogus"), 2, "unrecognized arguments"),
        (("--image", "{square}", "--top_p", "1.5"), 2, "--top_p"),
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
