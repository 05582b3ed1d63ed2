"""End to end on local files in The Cauldron's schema (no network): a folder with one subfolder per config,
parquet next to arrow, images as encoded bytes and as paths, and every kind of awkward row. Each row is
either in a batch once or counted as dropped for its reason, across workers and a resume; the stats CLI and
train/main.py read the same folder."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_helpers import png_bytes
from PIL import Image
from test_train_utils import DEBUG_TOML, MAIN, fast_tokenizer_dir, read_metrics, subprocess_env

from dualtower.data import stats as stats_cli
from dualtower.data.config import DataConfig
from dualtower.data.loader import build_loader
from dualtower.data.pipeline import ShardPipeline
from dualtower.data.sources import IndexedSource, LocalFiles, UnreadableSample, build_source, load_local_split

datasets = pytest.importorskip("datasets", reason="local Cauldron files need the optional `data` extra")

pytest_plugins = ["data_fixtures"]
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TAG = re.compile(r"\[r(\d+)\]")
LONG = " ".join(["word"] * 3000)  # far beyond a 512-token row




def _image(mode: str, size: tuple[int, int] = (60, 50)) -> Image.Image:
    if mode == "I;16":  # 16-bit grayscale, most of its range above 255
        return Image.fromarray(np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16))
    return Image.new(mode, size, {"1": 1, "L": 90, "P": 3, "LA": (90, 200)}.get(mode, (10, 120, 200, 128)[: len(mode)]))


def _encoded(image: Image.Image, fmt: str = "PNG") -> dict[str, Any]:
    return {"bytes": png_bytes(image, fmt), "path": None}


def _turns(tag: int, *pairs: tuple[Any, Any]) -> list[dict[str, Any]]:
    """Turns whose first answer carries the row's tag (when it has an answer to carry it)."""
    turns = [{"user": user, "assistant": answer} for user, answer in pairs]
    if turns and turns[0]["assistant"]:
        turns[0]["assistant"] = f"[r{tag}] {turns[0]['assistant']}"
    return turns


class Rows:
    """Rows of one config and the drop reason expected for each (None: it must reach a batch). A `tag` column
    (ignored by the pipeline) names each row; the answer of a row that can reach a batch carries it too."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.reasons: dict[int, str | None] = {}

    def add(self, tag: int, images: list[Any], turns: list[dict[str, Any]], reason: str | None = None) -> None:
        self.rows.append({"images": images, "texts": turns, "tag": tag})
        self.reasons[tag] = reason


def write_cauldron_folder(root: Path) -> dict[int, str | None]:
    """alpha: two parquet files of encoded images (Image feature); beta: a `save_to_disk` arrow file of plain
    bytes dicts; gamma: parquet of image paths whose turns carry an extra `source` field, as The Cauldron's do.
    Returns tag -> expected drop reason."""
    alpha, beta, gamma, tag = Rows(), Rows(), Rows(), iter(range(1000))
    for mode in ("RGB", "L", "RGBA", "P", "LA", "1", "I;16"):
        t = next(tag)
        alpha.add(t, [_encoded(_image(mode))], _turns(t, (f"mode {mode}?", "kept")))
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB", (3000, 5)))], _turns(t, ("a strip", "kept")))  # 600:1
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB", (2, 2)))], _turns(t, ("tiny", "no")), "image_too_small")
    t = next(tag)
    alpha.add(t, [{"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}], _turns(t, ("corrupt", "no")), "bad_image")
    t = next(tag)
    three = [_encoded(_image("RGB", (60 + i, 50))) for i in range(3)]
    alpha.add(t, three, _turns(t, ("<image> <image> which differs?", "the third")))  # text names 2 of 3 images
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))] * 4, _turns(t, ("four", "20 tiles")), "too_many_tiles")
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB", (8, 8)))] * 11, _turns(t, ("eleven", "no")), "too_many_images")
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], [], "no_turns")
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, ("empty answer", "")), "no_turns")
    t = next(tag)
    alpha.add(t, [], _turns(t, ("no image", "no")), "no_images")
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, (None, "question missing")))
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, ("naïve — 日本語 🙂?", "✓ ünïcödé")))
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, ("literal <|image|> here", "kept")))
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, ("long answer", LONG)))  # cut inside the answer
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, ("short", "first turn kept"), ("then long", LONG)))
    t = next(tag)
    alpha.add(t, [_encoded(_image("RGB"))], _turns(t, (LONG, "never reached")), "no_supervised_tokens")
    for _ in range(6):
        t = next(tag)
        beta.add(t, [_encoded(_image("RGB", (40 + t, 30)), "JPEG")], _turns(t, (f"plain {t}", "kept")))
    t = next(tag)
    beta.add(t, [_encoded(_image("RGB").convert("CMYK"), "JPEG")], _turns(t, ("cmyk", "kept")))
    t = next(tag)
    truncated = png_bytes(Image.effect_noise((60, 50), 40).convert("RGB"))
    beta.add(t, [{"bytes": truncated[: len(truncated) // 2], "path": None}], _turns(t, ("cut", "no")), "bad_image")
    (root / "files").mkdir(parents=True)
    for _ in range(4):
        t = next(tag)
        path = root / "files" / f"{t}.png"
        _image("RGB", (70, 40 + t)).save(path)
        gamma.add(t, [str(path)], _turns(t, (f"path {t}", "kept")))
    t = next(tag)
    gamma.add(t, [str(root / "files" / "missing.png")], _turns(t, ("gone", "no")), "bad_image")
    for row in gamma.rows:
        for turn in row["texts"]:
            turn["source"] = "gamma"
    image_list = datasets.List(datasets.Image())
    text_list = datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")})
    features = datasets.Features({"images": image_list, "texts": text_list, "tag": datasets.Value("int64")})
    (root / "alpha").mkdir()
    half = len(alpha.rows) // 2
    for index, part in enumerate((alpha.rows[:half], alpha.rows[half:])):
        datasets.Dataset.from_list(part, features=features).to_parquet(str(root / "alpha" / f"train-{index}.parquet"))
    datasets.Dataset.from_list(beta.rows).save_to_disk(str(root / "beta"))
    (root / "gamma").mkdir()
    datasets.Dataset.from_list(gamma.rows).to_parquet(str(root / "gamma" / "train.parquet"))
    return {**alpha.reasons, **beta.reasons, **gamma.reasons}


@pytest.fixture(scope="module")
def cauldron_folder(tmp_path_factory) -> tuple[Path, dict[int, str | None]]:
    root = tmp_path_factory.mktemp("cauldron") / "local"
    return root, write_cauldron_folder(root)


def local_cfg(root: Path, **overrides: Any) -> DataConfig:
    base = DataConfig(source=str(root), max_tokens_per_row=512, max_tiles_per_row=18, rows_per_batch=2,
                      shuffle_buffer=6, max_wait_batches=4, num_workers=2, min_image_side=4, val_ratio=0.0)
    return replace(base, **overrides)


def tags_of(batch: Any, tokenizer: Any) -> list[int]:
    found = []
    for i in range(batch.num_docs):
        text = tokenizer.decode(batch.text_ids[batch.cu_text[i] : batch.cu_text[i + 1]])
        found += [int(m) for m in TAG.findall(text)]
    return found


def tags_in_split(root: Path, split: str, val_ratio: float) -> list[int]:
    rows = load_local_split(root, split, val_ratio, DataConfig().seed)
    return [rows[i]["tag"] for i in range(len(rows))]


def test_every_row_of_a_pass_is_in_one_batch_or_dropped_for_its_reason(cauldron_folder, tokenizer, debug_cfg):
    root, reasons = cauldron_folder
    cfg = local_cfg(root, val_ratio=0.6)
    val = tags_in_split(root, "val", 0.6)
    assert sorted(val + tags_in_split(root, "train", 0.6)) == sorted(reasons)
    loader = build_loader(cfg, debug_cfg, tokenizer, split="val")
    seen = Counter(t for batch in loader for t in tags_of(batch, tokenizer))
    stats = loader.stats
    assert stats.read == len(val) == int(len(reasons) * 0.6) == stats.samples + stats.num_dropped
    assert seen == Counter(t for t in val if reasons[t] is None) and stats.samples == len(seen)
    assert stats.dropped == Counter(reasons[t] for t in val if reasons[t] is not None)


def test_one_epoch_of_train_reads_every_row_of_every_config_once(cauldron_folder):
    root, reasons = cauldron_folder
    source = build_source(local_cfg(root), "train")
    tags = [row["tag"] for shard in range(3) for _, row in source.iterate(0, shard, 3)]
    assert sorted(tags) == sorted(reasons)


def test_resume_mid_epoch_with_workers_neither_repeats_nor_loses_a_row(cauldron_folder, tokenizer, debug_cfg):
    root, reasons = cauldron_folder
    cfg = local_cfg(root)
    good = {t for t, r in reasons.items() if r is None}
    reference = []
    for batch in build_loader(cfg, debug_cfg, tokenizer):
        reference.append(tags_of(batch, tokenizer))
        if len(reference) == 12:
            break
    first = build_loader(cfg, debug_cfg, tokenizer)
    head = []
    for batch in first:
        head.append(tags_of(batch, tokenizer))
        if len(head) == 4:
            break
    state = json.loads(json.dumps(first.state_dict()))
    buffered = sum(len(worker["buffer"]) for worker in state["workers"].values())
    stats = first.stats
    assert stats.read == stats.samples + stats.num_dropped + buffered
    resumed = build_loader(cfg, debug_cfg, tokenizer)
    resumed.load_state_dict(state)
    tail = []
    for batch in resumed:
        tail.append(tags_of(batch, tokenizer))
        if len(tail) == 8:
            break
    assert head + tail == reference
    delivered = {t for batch in reference for t in batch}
    assert delivered <= good and len(delivered) > len(good) // 2  # 12 batches of 2 packed rows reach far


def test_stats_cli_over_the_local_folder(cauldron_folder, capsys):
    root, reasons = cauldron_folder
    summary = stats_cli.main(["--source", str(root), "--flavor", "debug", "--num-samples", "8", "--max-tokens", "512",
                              "--max-tiles", "18", "--shuffle-buffer", "6", "--num-workers", "2", "--rows-per-batch",
                              "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    # The CLI stops mid-epoch: what was read is in a batch, dropped, or still in the packing buffer.
    assert summary["samples"] >= 8 and summary["buffered"] > 0
    assert summary["read"] == summary["samples"] + sum(summary["dropped"].values()) + summary["buffered"]
    assert set(summary["dropped"]) <= {r for r in reasons.values() if r} and summary["events"]


def test_an_unreadable_file_is_named_by_the_loader_and_the_stats_cli(tmp_path, tokenizer, debug_cfg):
    root = tmp_path / "local"
    (root / "alpha").mkdir(parents=True)
    datasets.Dataset.from_list([{"images": [_encoded(_image("RGB"))], "texts": _turns(0, ("q", "a"))}]).to_parquet(
        str(root / "alpha" / "good.parquet"))
    broken = root / "beta" / "broken.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 this is no parquet file")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        build_loader(local_cfg(root), debug_cfg, tokenizer)
    with pytest.raises(SystemExit, match=re.escape(str(broken))):
        stats_cli.main(["--source", str(root), "--flavor", "debug", "--num-workers", "0"])


def test_a_dropped_row_is_logged_with_its_file_and_row(cauldron_folder, tokenizer, debug_cfg, caplog):
    root, reasons = cauldron_folder
    cfg = local_cfg(root, num_workers=0)
    pipeline = ShardPipeline(build_source(cfg, "train"), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)
    with caplog.at_level(logging.WARNING, logger="dualtower.data.pipeline"):
        for _ in pipeline:
            pass
    assert pipeline.stats.read == len(reasons) == pipeline.stats.samples + pipeline.stats.num_dropped
    # alpha's first file holds tags 0..10: tag 8 is the 2x2 image, tag 9 the corrupt one.
    first = root / "alpha" / "train-0.parquet"
    assert any(f"{first} row 8): image_too_small" in message for message in caplog.messages), caplog.messages
    assert any(f"{first} row 9): bad_image" in message for message in caplog.messages), caplog.messages


def test_a_validation_split_too_small_for_any_row_says_why(cauldron_folder):
    root, reasons = cauldron_folder
    # A ratio above 0 can still hold out no row; "set data.val_ratio > 0" would send the user in circles.
    with pytest.raises(ValueError, match=rf"data.val_ratio 0.02 of {len(reasons)} rows is no whole row"):
        load_local_split(root, "val", 0.02, 0)


def test_a_folder_of_datasetdicts_is_refused_rather_than_pooling_their_validation_rows(tmp_path):
    rows = [{"images": [_encoded(_image("RGB"))], "texts": _turns(i, ("q", "a"))} for i in range(4)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                                   "validation": datasets.Dataset.from_list(rows[3:])})
    splits.save_to_disk(str(tmp_path / "alpha"))
    with pytest.raises(ValueError, match="would train on their validation rows"):
        load_local_split(tmp_path, "train", 0.0, 0)
    assert len(load_local_split(tmp_path / "alpha", "train", 0.0, 0)) == 3  # one of them is read by its splits


def test_a_row_that_fails_to_read_names_its_file():
    class Broken:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            raise OSError("checksum mismatch")

    rows = LocalFiles(["a.parquet", "b.arrow"], [[{"images": []}], Broken()])
    assert rows[0] == {"images": []} and len(rows.select([2, 0])) == 2
    unreadable = IndexedSource(rows, 0, shuffle=False).fetch(0, 0, 1, [1])[1]
    assert isinstance(unreadable, UnreadableSample) and "b.arrow row 0" in unreadable.error
    assert "b.arrow row 1" in IndexedSource(rows.select([2]), 0, shuffle=False).fetch(0, 0, 1, [0])[0].error


def test_a_missing_datasets_package_says_how_to_install_it(tmp_path, monkeypatch, tokenizer, debug_cfg):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'dualtower[data]'")):
        build_loader(local_cfg(path), debug_cfg, tokenizer)


def test_train_main_runs_a_few_steps_on_the_local_folder(cauldron_folder, tmp_path):
    root, _ = cauldron_folder
    run_dir = tmp_path / "run"
    args = ["--config", str(DEBUG_TOML), f"--job.run_dir={run_dir}",
            f"--model.tokenizer_id={fast_tokenizer_dir(tmp_path)}", f"--data.source={root}", "--data.val_ratio=0.2",
            "--data.rows_per_batch=2", "--data.shuffle_buffer=6", "--data.num_workers=2", "--training.steps=3",
            "--schedule.warmup_steps=1", "--metrics.log_every=1", "--metrics.progress=line", "--eval.at_end=true",
            "--eval.val_batches=2", "--eval.accuracy_samples=0", "--eval.every=0",
            "--checkpoint.export_final=false"]
    result = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=300,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("eval/loss" in r for r in records)
