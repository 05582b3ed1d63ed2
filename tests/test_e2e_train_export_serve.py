"""One user journey across modules, on the CPU: train the debug recipe (train/main.py), resume it, export it,
load the export (Python API and the generate CLI), score it offline (the evaluate CLI), and check the pieces
agree with each other: weights, tokenizer, config and greedy answers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_utils import (  # noqa: F401 (one_thread: a fixture)
    MAIN,
    fast_tokenizer_dir,
    one_thread,
    read_metrics,
    single_env,
    small_run_args,
    subprocess_env,
)

STEPS = 6
RUN_ARGS = ("--checkpoint.every=2", "--checkpoint.keep=3", "--checkpoint.export_final=true")
QUESTION_TYPES = ("color", "shape", "count")
TWO_RANKS = ("--data.num_workers=1", "--data.rows_per_batch=1")


def _train(run_dir: Path, tokenizer: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = small_run_args(run_dir, tokenizer, STEPS, *RUN_ARGS, *extra)
    launcher = [sys.executable, str(MAIN)]
    if nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher = [*torchrun, str(MAIN)]
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("journey")
    tokenizer = fast_tokenizer_dir(base)
    run = base / "run"
    _train(run, tokenizer)
    return {"base": base, "tokenizer": tokenizer, "run": run, "export": run / "export"}


def _question(base: Path) -> tuple[Path, str]:
    from dualtower.data.synthetic import heldout_examples

    example = heldout_examples(1, seed=3, question_types=QUESTION_TYPES)[0]
    path = base / "question.png"
    example["images"][0].save(path)
    return path, example["question"]


# -- training, resume and export ----------------------------------------------------------------------------


def test_export_round_trips_the_recipe_config_and_tokenizer(journey) -> None:
    from dualtower.model import DualTowerVLM, flavor
    from dualtower.tokenizer import load_tokenizer

    model = DualTowerVLM.from_pretrained(journey["export"])
    expected = flavor("debug")
    expected.image.mean = expected.image.std = (0.5, 0.5, 0.5)  # train/configs/debug.toml
    expected.tokenizer_id = str(journey["tokenizer"])
    assert model.cfg == expected
    assert model.training is False and {p.dtype for p in model.parameters()} == {torch.float32}
    # The tokenizer saved with the export is the one the run trained with.
    saved = load_tokenizer(checkpoint_dir=journey["export"])
    trained = load_tokenizer(tokenizer_id=str(journey["tokenizer"]))
    assert saved.get_vocab() == trained.get_vocab() and saved.chat_template == trained.chat_template
    text = "<|im_start|>user\n<|image|><row_1_col_2>How many 12 circles?<|im_end|>"
    assert saved(text).input_ids == trained(text).input_ids


def test_export_only_of_the_last_checkpoint_equals_the_final_export(journey) -> None:
    run = journey["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_0000000{s}" for s in (2, 4, 6)]
    extra = [f"--checkpoint.resume={run / 'checkpoints' / 'step_00000006'}", "--checkpoint.export_only=true",
             "--checkpoint.export_folder=export_step6"]
    _train(run, journey["tokenizer"], *extra)
    _assert_same_weights(_weights(run / "export_step6"), _weights(journey["export"]))
    assert (run / "export_step6" / "config.json").read_text() == (journey["export"] / "config.json").read_text()
    recorded = json.loads((run / "config.json").read_text())  # the training run's record, not the export's
    assert recorded["checkpoint"]["export_only"] is False


def test_export_only_refuses_preprocessing_the_checkpoint_was_not_trained_with(journey) -> None:
    """The weights were trained on pixels normalized with the recipe's image mean/std: an export that records
    other values (here an export run whose recipe omits them) would serve every image wrongly, silently."""
    run = journey["run"]
    extra = [f"--checkpoint.resume={run / 'checkpoints' / 'step_00000006'}", "--checkpoint.export_only=true",
             "--checkpoint.export_folder=export_wrong", "--model.image_mean=0,0,0", "--model.image_std=1,1,1"]
    args = small_run_args(run, journey["tokenizer"], STEPS, *RUN_ARGS, *extra)
    done = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert done.returncode == 3, done.stderr[-3000:]
    assert "image.mean" in done.stderr and "image.std" in done.stderr
    assert not (run / "export_wrong" / "model.safetensors").exists()


def test_resumed_run_exports_the_same_weights(journey) -> None:
    resumed = journey["base"] / "resumed"
    step2 = journey["run"] / "checkpoints" / "step_00000002"
    done = _train(resumed, journey["tokenizer"], f"--checkpoint.resume={step2}")
    assert "resumed from" in done.stderr
    _assert_same_weights(_weights(resumed / "export"), _weights(journey["export"]))


@pytest.mark.dist
@pytest.mark.slow  # 20 s; test_two_rank_final_export_equals_its_last_checkpoint covers the 2-rank export in CI
def test_two_fsdp_ranks_export_a_checkpoint_as_one_rank_does(journey) -> None:
    """The same (1-rank) checkpoint exported by 2 FSDP ranks (gloo) and by 1 rank: the same files."""
    base, tokenizer = journey["base"], journey["tokenizer"]
    step4 = f"--checkpoint.resume={journey['run'] / 'checkpoints' / 'step_00000004'}"
    export_only = ("--checkpoint.export_only=true", "--checkpoint.export_folder=export4")
    _train(base / "two_export", tokenizer, *TWO_RANKS, step4, *export_only, nproc=2)
    _train(base / "one_export", tokenizer, step4, *export_only)
    one, two = base / "one_export" / "export4", base / "two_export" / "export4"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.dist
def test_two_rank_final_export_equals_its_last_checkpoint(journey) -> None:
    """A 2-rank FSDP run's final export (gathered from the live shards) equals what one rank exports from the
    run's last checkpoint, and carries the same config and files as a 1-rank run's."""
    base, tokenizer = journey["base"], journey["tokenizer"]
    _train(base / "two", tokenizer, *TWO_RANKS, nproc=2)
    step6 = f"--checkpoint.resume={base / 'two' / 'checkpoints' / 'step_00000006'}"
    _train(base / "two", tokenizer, step6, "--checkpoint.export_only=true", "--checkpoint.export_folder=export6")
    final = base / "two" / "export"
    assert (final / "model.safetensors").read_bytes() == (base / "two" / "export6" / "model.safetensors").read_bytes()
    assert (final / "config.json").read_text() == (journey["export"] / "config.json").read_text()
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in journey["export"].iterdir())


# -- the in-memory trained model against the export -----------------------------------------------------------


def _train_in_process(run_dir: Path, tokenizer_dir: Path):
    from dualtower.config import load_job_config
    from dualtower.data.loader import build_loader
    from dualtower.tokenizer import load_tokenizer
    from dualtower.training import Evaluator, build_model, build_trainer
    from dualtower.training.build import build_heldout

    evaluation = ("--eval.at_end=true", "--eval.val_batches=1", "--eval.accuracy_samples=4", "--eval.max_new_tokens=2")
    cfg = load_job_config(small_run_args(run_dir, tokenizer_dir, STEPS, *RUN_ARGS, *evaluation))
    env = single_env()
    model = build_model(cfg.model, cfg.training.seed, env.device)
    tokenizer = load_tokenizer(tokenizer_id=model.cfg.tokenizer_id)
    loaders = {s: build_loader(cfg.data, model.cfg, tokenizer, split=s, rank=0, world_size=1) for s in ("train", "val")}
    heldout = build_heldout(cfg.data, cfg.eval)
    evaluator = Evaluator(cfg.eval, loaders["val"], tokenizer, env, heldout)
    trainer = build_trainer(cfg, model, env, run_dir, loaders["train"], evaluator, tokenizer)
    try:
        trainer.train()
    finally:
        trainer.parts.metrics.close()
    return trainer.model.eval(), tokenizer, heldout


@pytest.mark.usefixtures("one_thread")
def test_export_serves_what_training_produced(journey) -> None:
    from dualtower.generation import GenerationRequest, SamplingConfig
    from dualtower.model import DualTowerVLM
    from dualtower.tokenizer import load_tokenizer

    run_dir = journey["base"] / "in_process"
    trained, trained_tokenizer, heldout = _train_in_process(run_dir, journey["tokenizer"])
    exported_state = _weights(run_dir / "export")
    trained_state = {k: v for k, v in trained.state_dict().items() if k in exported_state}
    _assert_same_weights(exported_state, trained_state)
    _assert_same_weights(exported_state, _weights(journey["export"]))  # the same run as the CLI's

    image_path, question = _question(journey["base"])
    from dualtower.data.images import load_image

    request = GenerationRequest([load_image(image_path)], question)
    greedy = SamplingConfig(max_new_tokens=4)
    loaded = DualTowerVLM.from_pretrained(run_dir / "export")
    loaded_tokenizer = load_tokenizer(checkpoint_dir=run_dir / "export", tokenizer_id=loaded.cfg.tokenizer_id)
    from_memory = trained.generate([request], trained_tokenizer, greedy)[0]
    from_export = loaded.generate([request], loaded_tokenizer, greedy)[0]
    assert from_export.token_ids == from_memory.token_ids and from_export.text == from_memory.text
    assert len(from_export.token_ids) >= 1
    # The run's held-out accuracy (measured on its in-memory model) is the export's.
    from dualtower.training.evaluate import answer_accuracy, greedy_answers

    logged = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    answers = greedy_answers(loaded, loaded_tokenizer, heldout, max_new_tokens=2)
    assert len(heldout) == 4 and logged[-1]["step"] == STEPS
    assert logged[-1]["eval/accuracy"] == answer_accuracy(answers, [e["answer"] for e in heldout])


def test_preprocessing_record_survives_json() -> None:
    from dualtower.model import flavor
    from dualtower.training.checkpoint import preprocessing_changes

    cfg = flavor("debug")
    saved = json.loads(json.dumps({"image": dataclasses.asdict(cfg.image)}))  # tuples come back as lists
    assert preprocessing_changes(saved, cfg) == []
    assert preprocessing_changes({}, cfg) == []  # a checkpoint from before the record
    cfg.image.max_img_size, cfg.image.std = 512, (0.5, 0.5, 0.5)
    assert preprocessing_changes(saved, cfg) == [
        "image.max_img_size 256 -> 512", "image.std (1.0, 1.0, 1.0) -> (0.5, 0.5, 0.5)"
    ]


# -- the CLIs on the export -----------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_generate_cli_answers_like_the_python_api(journey) -> None:
    from dualtower.data.images import load_image
    from dualtower.generation import GenerationRequest, SamplingConfig
    from dualtower.model import DualTowerVLM
    from dualtower.tokenizer import load_tokenizer

    export = journey["export"]
    image_path, question = _question(journey["base"])
    model = DualTowerVLM.from_pretrained(export)
    tokenizer = load_tokenizer(checkpoint_dir=export, tokenizer_id=model.cfg.tokenizer_id)
    request = GenerationRequest([load_image(image_path)], question)
    expected = model.generate([request], tokenizer, SamplingConfig(max_new_tokens=5))[0]

    common = ["-m", "dualtower.generate", "--checkpoint", str(export), "--max_new_tokens=5", "--device=cpu"]
    single = _cli(*common, "--image", str(image_path), "--prompt", question, "--jsonl", "--stats")
    record = json.loads(single.stdout)
    assert record["text"] == expected.text and record["tokens"] == len(expected.token_ids)
    assert "stats:" in single.stderr

    requests = journey["base"] / "requests.jsonl"
    lines = [{"image": image_path.name, "prompt": question}, {"images": [str(image_path)], "prompt": question}]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    batch = _cli(*common, "--requests", str(requests))
    assert batch.stdout.splitlines() == [expected.text.strip()] * 2


def test_offline_mmstar_scores_the_export(journey) -> None:
    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet

    parquet = build_mmstar_parquet(journey["base"] / "mmstar.parquet", 4)
    output = journey["base"] / "mmstar_results.json"
    done = _cli(
        "-m", "dualtower.evaluate", "--model", str(journey["export"]), "--offline-parquet", str(parquet),
        "--output_path", str(output), "--batch_size", "2", "--device", "cpu", "--log_samples",
    )
    assert "MMStar (offline, 4 samples" in done.stdout
    document = json.loads(output.read_text())
    assert document["num_samples"] == 4 and document["config"]["model"] == str(journey["export"])
    assert 0.0 <= document["results"]["average"] <= 1.0
