"""The loader: PackedBatch out of every source, deterministic, exact resume, disjoint ranks, drops counted."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
import torch
from data_helpers import png_bytes, sample
from PIL import Image

from dualtower.batch import PackedBatch
from dualtower.data import loader as loader_module
from dualtower.data import stats as stats_cli
from dualtower.data.config import DataConfig, SyntheticConfig
from dualtower.data.document import PreparedDocument
from dualtower.data.loader import build_loader
from dualtower.data.pipeline import ShardPipeline
from dualtower.data.sources import CauldronSource, IndexedSource
from dualtower.model.config import ConfigError

pytest_plugins = ["data_fixtures"]
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def small_cfg(**overrides) -> DataConfig:
    base = DataConfig(
        max_tokens_per_row=512, max_tiles_per_row=18, rows_per_batch=2, shuffle_buffer=12, num_workers=0,
        max_wait_batches=4, synthetic=SyntheticConfig(num_train=40, num_val=13, num_heldout=10),
    )
    return replace(base, **overrides)


def same(a: PackedBatch, b: PackedBatch) -> bool:
    for f in fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            return False
    return True


def take(loader, n: int) -> list[PackedBatch]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def doc_keys(batch: PackedBatch) -> list[tuple]:
    """One hashable identity per document: its tokens and the sum of its pixels."""
    keys, tile = [], 0
    for i in range(batch.num_docs):
        p0, p1, t0, t1 = *batch.cu_prefix[i : i + 2].tolist(), *batch.cu_text[i : i + 2].tolist()
        n = int(batch.tiles_per_doc[i])
        pixels = round(float(batch.pixel_values[tile : tile + n].sum()), 3)
        keys.append((tuple(batch.prefix_ids[p0:p1].tolist() + batch.text_ids[t0:t1].tolist()), pixels))
        tile += n
    return keys


def test_batches_respect_the_budgets(tokenizer, debug_cfg):
    loader = build_loader(small_cfg(), debug_cfg, tokenizer)
    for batch in take(loader, 4):
        assert isinstance(batch, PackedBatch) and batch.num_rows <= 2 and batch.row_capacity == 512
        for row in range(batch.num_rows):
            docs = (batch.doc_row == row).nonzero().flatten().tolist()
            assert sum(int(batch.cu_prefix[d + 1] - batch.cu_prefix[d] + batch.cu_text[d + 1] - batch.cu_text[d])
                       for d in docs) <= 512
            assert int(batch.tiles_per_doc[docs].sum()) <= 18
        assert batch.pixel_values.shape[1:] == (3, 128, 128)
    stats = loader.stats
    assert stats.batches == 4 and stats.samples > 0 and 0 < stats.packing_efficiency <= 1
    assert stats.tiles_per_row <= 18 and stats.capacity == stats.rows * 512


def test_unpacked_mode_is_one_document_per_row(tokenizer, debug_cfg):
    batch = take(build_loader(small_cfg(pack=False, rows_per_batch=3), debug_cfg, tokenizer), 1)[0]
    assert batch.num_docs == batch.num_rows == 3 and batch.doc_row.tolist() == [0, 1, 2] and batch.row_capacity == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tokenizer, debug_cfg, workers):
    cfg = small_cfg(num_workers=workers)
    reference = take(build_loader(cfg, debug_cfg, tokenizer), 13)  # crosses epochs: 40 samples / ~4 per batch
    first = build_loader(cfg, debug_cfg, tokenizer)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # the state must survive serialization
    resumed = build_loader(cfg, debug_cfg, tokenizer)
    resumed.load_state_dict(state)
    tail = take(resumed, 8)
    assert all(same(a, b) for a, b in zip(head + tail, reference, strict=True))
    assert resumed.stats.batches == 13
    assert max(w["epoch"] for w in resumed.state_dict()["workers"].values()) >= 1


class _InProcessWorkers:
    """Stands in for torch's DataLoader: `num_workers` iterators of the dataset, each seeing its own worker id,
    read round-robin from worker 0 on (what the torch DataLoader does with worker processes)."""

    worker_id = 0

    def __init__(self, dataset, num_workers: int, **_) -> None:
        self.dataset, self.num_workers = dataset, num_workers

    def __iter__(self):
        workers = []
        for worker_id in range(self.num_workers):
            _InProcessWorkers.worker_id = worker_id
            iterator = iter(self.dataset)
            workers.append(itertools.chain([next(iterator)], iterator))  # the worker reads its id here
        while True:
            for iterator in workers:
                yield next(iterator)


def test_a_resumed_loader_hands_each_worker_the_logical_worker_whose_turn_it_is(monkeypatch, tokenizer, debug_cfg):
    monkeypatch.setattr(loader_module, "DataLoader", _InProcessWorkers)
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: SimpleNamespace(id=_InProcessWorkers.worker_id))

    def pipeline(logical: int, state: dict | None):  # batch k of logical worker w is "w:k"; resumable
        return ((f"{logical}:{k}", {"next": k + 1}) for k in itertools.count(state["next"] if state else 0))

    loaders = [build_loader(small_cfg(num_workers=3), debug_cfg, tokenizer) for _ in range(2)]
    for loader in loaders:
        monkeypatch.setattr(loader, "pipeline", pipeline)
    first, resumed = loaders
    assert take(first, 4) == ["0:0", "1:0", "2:0", "0:1"]
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert take(resumed, 5) == ["1:1", "2:1", "0:2", "1:2", "2:2"]  # 4 % 3: physical worker 0 runs logical 1


def test_workers_started_by_forkserver_yield_the_same_batches(tokenizer, debug_cfg):
    """Python 3.14 makes forkserver the default on Linux: everything a worker needs must survive pickling."""
    forked = take(build_loader(small_cfg(num_workers=2, worker_start_method="fork"), debug_cfg, tokenizer), 4)
    served = take(build_loader(small_cfg(num_workers=2, worker_start_method="forkserver"), debug_cfg, tokenizer), 4)
    assert all(same(a, b) for a, b in zip(forked, served, strict=True))


def test_state_of_another_setup_is_refused(tokenizer, debug_cfg):
    loader = build_loader(small_cfg(), debug_cfg, tokenizer)
    take(loader, 1)
    other = build_loader(small_cfg(num_workers=2), debug_cfg, tokenizer)
    with pytest.raises(ValueError, match="num_logical_workers"):
        other.load_state_dict(loader.state_dict())
    for changed, key in ((small_cfg(pack=False), "pack"), (small_cfg(seed=1), "seed")):
        with pytest.raises(ValueError, match=f"'{key}'"):  # a packed stream does not continue as an unpacked one
            build_loader(changed, debug_cfg, tokenizer).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="'split'"):
        build_loader(small_cfg(), debug_cfg, tokenizer, "val").load_state_dict(loader.state_dict())


def test_finite_split_once_and_ranks_disjoint(tokenizer, debug_cfg):
    cfg = small_cfg(num_workers=0)
    per_rank = [[k for b in build_loader(cfg, debug_cfg, tokenizer, "val", r, 2) for k in doc_keys(b)] for r in (0, 1)]
    whole = [k for b in build_loader(cfg, debug_cfg, tokenizer, "val") for k in doc_keys(b)]
    assert len(whole) == 13 and len(set(whole)) == 13
    assert not set(per_rank[0]) & set(per_rank[1]) and Counter(per_rank[0] + per_rank[1]) == Counter(whole)
    loader = build_loader(cfg, debug_cfg, tokenizer, "val")
    passes = [[k for b in loader for k in doc_keys(b)] for _ in range(2)]
    assert passes[0] == passes[1]  # each pass starts over
    assert loader.stats.samples == 13  # the counters of the last pass stay readable


def test_a_loader_restored_after_a_finished_pass_starts_a_new_pass(tokenizer, debug_cfg):
    cfg = small_cfg(num_workers=0)
    loader = build_loader(cfg, debug_cfg, tokenizer, "val")
    whole = [doc_keys(b) for b in loader]
    restored = build_loader(cfg, debug_cfg, tokenizer, "val")
    restored.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert restored.stats.samples == 13  # the finished pass's counters
    assert [doc_keys(b) for b in restored] == whole and sum(map(len, whole)) == 13


def test_every_document_once_or_counted_as_dropped(tokenizer, debug_cfg):
    good = Image.new("RGB", (90, 60), (0, 200, 0))
    raw = [sample([good], (f"question {i}?", f"answer {i}")) for i in range(25)]
    raw[3] = sample([b"\x89PNG broken"], ("q", "a"))
    raw[7] = sample([Image.new("RGB", (1, 1))], ("q", "a"))
    raw[11] = {"images": [good]}
    raw[15] = sample([good], ("long", " ".join(["x"] * 5000)))  # truncated, kept
    raw[19] = sample([png_bytes(good.convert("CMYK"), "JPEG")], ("cmyk", "kept"))
    cfg = small_cfg(min_image_side=4)
    pipeline = ShardPipeline(IndexedSource(raw, 0, shuffle=False), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)
    batches = [batch for batch, _ in pipeline]
    texts = [tokenizer.decode(b.text_ids[b.cu_text[i] : b.cu_text[i + 1]]) for b in batches for i in range(b.num_docs)]
    kept = [i for i in range(25) if i not in (3, 7, 11)]
    for i in kept:
        marker = "kept" if i == 19 else ("long" if i == 15 else f"answer {i}<")
        assert sum(marker in text for text in texts) == 1, i
    stats = pipeline.stats
    assert stats.read == 25 and stats.samples == len(kept) == len(texts)
    assert dict(stats.dropped) == {"bad_image": 1, "image_too_small": 1, "no_turns": 1}
    assert stats.events["truncated"] == 1 and stats.events["image_converted"] == 1


def test_buffer_holds_no_pixels_and_late_image_failures_are_dropped(tmp_path, tokenizer, debug_cfg):
    path = tmp_path / "vanishing.png"
    path.write_bytes(png_bytes(Image.new("RGB", (60, 60), (5, 5, 5))))
    good = Image.new("RGB", (60, 60), (200, 0, 0))

    class Items(list):
        def __getitem__(self, index):  # reading the last sample deletes the first one's file
            if index == len(self) - 1:
                path.unlink()
            return super().__getitem__(index)

    raw = Items([sample([str(path)], ("gone?", "yes")), sample([good], ("q1", "a1")), sample([good], ("q2", "a2"))])
    pipeline = ShardPipeline(IndexedSource(raw, 0, False), small_cfg(), debug_cfg, tokenizer, 0, 1, infinite=False)
    batches = []
    for batch, _ in pipeline:
        assert all(isinstance(item.payload, PreparedDocument) for item in pipeline.packer.buffer)
        batches.append(batch)
    assert sum(b.num_docs for b in batches) == 2 and pipeline.stats.dropped == Counter({"bad_image": 1})


def test_a_rebuilt_image_token_or_a_changed_image_file_costs_at_most_its_document(tmp_path, tokenizer, debug_cfg):
    path = tmp_path / "changing.png"
    path.write_bytes(png_bytes(Image.new("RGB", (256, 64), (5, 5, 5))))  # a 1x2 grid: 3 tiles
    good = Image.new("RGB", (60, 60), (200, 0, 0))

    class Items(list):
        def __getitem__(self, index):  # reading the last sample makes the first one's image a 5-tile one
            if index == len(self) - 1:
                path.write_bytes(png_bytes(Image.new("RGB", (64, 64), (5, 5, 5))))
            return super().__getitem__(index)

    raw = Items([sample([str(path)], ("changed?", "yes")), sample([good], ("look <|ima<|image|>ge|> here", "ok")),
                 sample([good], ("q", "a"))])
    pipeline = ShardPipeline(IndexedSource(raw, 0, False), small_cfg(), debug_cfg, tokenizer, 0, 1, infinite=False)
    batches = [batch for batch, _ in pipeline]
    assert sum(b.num_docs for b in batches) == 2 and pipeline.stats.dropped == Counter({"image_placeholders": 1})
    assert pipeline.stats.events["image_token_stripped"] == 1


def test_a_buffered_sample_gone_on_resume_is_counted_as_dropped(tokenizer, debug_cfg):
    """read = samples + dropped + still buffered holds across a resume whose source lost buffered samples."""
    good = Image.new("RGB", (60, 60), (0, 90, 0))
    raw = [sample([good], (f"q{i}", f"a{i}")) for i in range(20)]
    first = ShardPipeline(IndexedSource(raw, 0, False), small_cfg(), debug_cfg, tokenizer, 0, 1, infinite=False)
    _, state = next(iter(first))
    buffered = len(state["buffer"])
    assert buffered > 0
    source = IndexedSource(raw, 0, False)
    source.fetch = lambda epoch, shard, num_shards, positions: {}  # the buffered samples are gone
    resumed = ShardPipeline(source, small_cfg(), debug_cfg, tokenizer, 0, 1, infinite=False, state=state)
    assert resumed.stats.dropped["gone_on_resume"] == buffered
    for _ in resumed:
        pass
    stats = resumed.stats
    assert stats.read == 20 and stats.samples + stats.num_dropped == stats.read


def _fake_cauldron(monkeypatch):
    """Two configs of a local, in-memory dataset in The Cauldron's schema, streamed like the Hub's."""
    import datasets

    colors = {"alpha": (255, 0, 0), "beta": (0, 0, 255)}
    sizes = {"alpha": 30, "beta": 10}

    def load(self, name):
        rows = [sample([Image.new("RGB", (40 + i, 30), colors[name])], (f"{name} {i}?", f"{name}{i}"))
                for i in range(sizes[name])]
        rows[2]["images"] = [{"bytes": b"not an image", "path": None}]
        return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(CauldronSource, "_load_from_hub", load)
    monkeypatch.setattr(CauldronSource, "_size_from_hub", lambda self, name: sizes[name])


def test_cauldron_streaming_path_with_a_local_fake(monkeypatch, tokenizer, debug_cfg):
    _fake_cauldron(monkeypatch)
    cfg = small_cfg(source="cauldron", cauldron_configs=("alpha", "beta"), val_ratio=0.1, shuffle_buffer=6)
    val = " ".join(tokenizer.decode(b.text_ids) for b in build_loader(cfg, debug_cfg, tokenizer, "val"))
    val_questions = set(re.findall(r"(?:alpha|beta) \d+\?", val))
    assert 1 <= len(val_questions) <= 10
    reference = take(build_loader(cfg, debug_cfg, tokenizer), 6)
    first = build_loader(cfg, debug_cfg, tokenizer)
    head = take(first, 3)
    resumed = build_loader(cfg, debug_cfg, tokenizer)
    resumed.load_state_dict(first.state_dict())
    assert all(same(a, b) for a, b in zip(head + take(resumed, 3), reference, strict=True))
    train_text = " ".join(tokenizer.decode(b.text_ids) for b in reference)
    assert not val_questions & set(re.findall(r"(?:alpha|beta) \d+\?", train_text))
    assert resumed.stats.dropped["bad_image"] >= 1


def _text_rows(name: str, count: int, files: int):
    """An iterable dataset of `count` text-only rows in `files` data files, as The Cauldron streams them."""
    import datasets

    rows = [sample([], (f"{name} {i}?", f"{name}{i}")) for i in range(max(count, 1))]
    return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=min(files, len(rows))).take(count)


@pytest.mark.parametrize("files", [1, 3])
def test_cauldron_val_and_train_partition_the_rows_under_any_sharding(files):
    sizes = {"alpha": 30, "beta": 17, "gamma": 6}

    def read(split: str, num_shards: int) -> list[str]:
        source = CauldronSource("fake", tuple(sizes), split, 42, 0.25,
                                lambda name: _text_rows(name, sizes[name], files), lambda name: sizes[name])
        shards = [source.iterate(0, shard, num_shards) for shard in range(num_shards)]
        return [row["texts"][0]["user"] for shard in shards for _, row in shard]

    every = {f"{name} {i}?" for name, size in sizes.items() for i in range(size)}
    held_out = None
    for num_shards in (1, 2, 3):  # loader shards = world_size x num_workers
        val, train = read("val", num_shards), set(read("train", num_shards))
        assert len(val) == len(set(val)) and not set(val) & train and set(val) | train == every, num_shards
        held_out = held_out or set(val)
        assert set(val) == held_out  # the same rows whatever the sharding
    assert 0 < len(held_out) < len(every) / 2


def test_cauldron_config_without_rows_does_not_make_an_endless_epoch():
    sizes = {"alpha": 5, "empty": 0}
    source = CauldronSource("fake", tuple(sizes), "train", 0, 0.0, lambda name: _text_rows(name, sizes[name], 1),
                            lambda name: sizes[name])
    assert len(list(itertools.islice(source.iterate(0, 0, 1), 50))) == 5


def test_local_parquet_source(tmp_path, tokenizer, debug_cfg):
    import datasets

    rows = [{"images": [{"bytes": png_bytes(Image.new("RGB", (50, 40), (i, 0, 0))), "path": None}],
             "texts": [{"user": f"row {i}?", "assistant": str(i)}]} for i in range(20)]
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    cfg = small_cfg(source=str(path), val_ratio=0.25)
    val = [k for b in build_loader(cfg, debug_cfg, tokenizer, "val") for k in doc_keys(b)]
    train = take(build_loader(cfg, debug_cfg, tokenizer), 3)
    assert len(val) == 5 and not set(val) & {k for b in train for k in doc_keys(b)}


def test_config_validation():
    with pytest.raises(ConfigError, match="max_sample_tokens"):
        DataConfig(max_sample_tokens=9000).validate()
    with pytest.raises(ConfigError, match="question_types"):
        DataConfig(synthetic=SyntheticConfig(question_types=("colour",))).validate()
    with pytest.raises(ConfigError, match="worker_start_method"):
        DataConfig(worker_start_method="thread").validate()
    with pytest.raises(ConfigError, match="unknown key"):
        DataConfig.from_dict({"sauce": "synthetic"})
    # Packed rows start from buffered documents: a buffer smaller than a batch gave one-row batches.
    with pytest.raises(ConfigError, match=r"shuffle_buffer \(2\) must be >= data.rows_per_batch \(4\)"):
        DataConfig(rows_per_batch=4, shuffle_buffer=2).validate()
    DataConfig(rows_per_batch=4, shuffle_buffer=2, pack=False).validate()  # unpacked, the buffer is one batch
    cfg = DataConfig.from_dict({"source": "cauldron", "synthetic": {"difficulty": "hard"}, "cauldron_configs": ["a"]})
    assert cfg.synthetic.difficulty == "hard" and cfg.cauldron_configs == ("a",)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_stats_cli_prints_json_last(capsys):
    summary = stats_cli.main(["--flavor", "debug", "--num-samples", "24", "--max-tokens", "512", "--shuffle-buffer",
                              "8", "--num-workers", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = json.loads(lines[-1])
    assert parsed == json.loads(json.dumps(summary))
    assert parsed["samples"] >= 24 and parsed["samples_per_s"] > 0 and 0 < parsed["packing_efficiency"] <= 1
    assert any(line.startswith("packing") for line in lines[:-1])


def test_stats_cli_defaults_are_the_data_config_defaults():
    args, defaults = stats_cli.parse_args([]), DataConfig()
    assert (args.max_tokens, args.max_tiles, args.rows_per_batch, args.shuffle_buffer, args.num_workers, args.seed) == (
        defaults.max_tokens_per_row, defaults.max_tiles_per_row, defaults.rows_per_batch, defaults.shuffle_buffer,
        defaults.num_workers, defaults.seed)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_finite_pass_counts_what_it_read_after_its_last_batch(workers, monkeypatch, tokenizer, debug_cfg):
    """Samples read and dropped after a shard's last batch change no batch's state: the loader's counters must
    still hold them (the stats CLI and validation passes report them)."""
    good = Image.new("RGB", (64, 48), (0, 90, 0))
    raw = [sample([good], ("q", f"answer {i}")) for i in range(8)] + [sample([b"not an image"], ("q", "a"))] * 6
    monkeypatch.setattr(loader_module, "build_source", lambda cfg, split: IndexedSource(raw, 0, shuffle=False))
    loader = build_loader(small_cfg(num_workers=workers, shuffle_buffer=2), debug_cfg, tokenizer, split="val")
    batches = list(loader)
    assert sum(b.num_docs for b in batches) == 8 == loader.stats.samples
    assert loader.stats.read == 14 and dict(loader.stats.dropped) == {"bad_image": 6}
    assert loader.state_dict()["delivered"] == len(batches)
