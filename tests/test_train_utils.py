"""Shared builders for the trainer tests: a tiny model, packed batches and a Trainer over in-memory data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_helpers import random_batch

from dualtower.batch import PackedBatch
from dualtower.config import JobConfig
from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, ModelConfig, VisionConfig, flavor
from dualtower.parallel import DistEnv
from dualtower.training import Trainer
from dualtower.training import build_trainer as assemble


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not spin-wait against other processes on a busy CI)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config() -> ModelConfig:
    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=1)
    cfg.lm = LMConfig(hidden_dim=32, inter_dim=64, n_heads=4, n_kv_heads=2, n_blocks=2, base_vocab_size=1000)
    return cfg.validate()


def tiny_model(seed: int = 0) -> DualTowerVLM:
    torch.manual_seed(seed)
    return DualTowerVLM.from_config(tiny_config())


def make_batches(model: DualTowerVLM, layouts: list[list[tuple[int, int, int]]], seed: int = 0) -> list[PackedBatch]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(model, layout, generator) for layout in layouts]


class ListLoader:
    """An in-memory, resumable stand-in for the data loader."""

    def __init__(self, batches: list[PackedBatch]):
        self.batches = batches
        self.position = 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def single_env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def build_trainer(
    model: DualTowerVLM,
    batches: list[PackedBatch],
    run_dir: Path,
    cfg: JobConfig | None = None,
    env: DistEnv | None = None,
) -> Trainer:
    cfg = cfg or default_job()
    env = env or single_env()
    return assemble(cfg, model, env, run_dir, ListLoader(batches))


def default_job() -> JobConfig:
    cfg = JobConfig()
    cfg.optim.lr_vision = cfg.optim.lr_projector = cfg.optim.lr_left = cfg.optim.lr_right = 1e-3
    cfg.training.max_grad_norm = 0.0
    cfg.metrics.progress = "none"
    cfg.metrics.log_every = 1
    cfg.checkpoint.enabled = False
    cfg.checkpoint.export_final = False
    cfg.eval.at_end = False
    return cfg


def checkpointed_job(steps: int, every: int, keep: int = 1) -> JobConfig:
    """default_job with a checkpoint every `every` steps, the newest `keep` kept."""
    cfg = default_job()
    cfg.training.steps = steps
    cfg.checkpoint.enabled = True
    cfg.checkpoint.every = every
    cfg.checkpoint.keep = keep
    return cfg


def test_list_loader_is_resumable() -> None:
    loader = ListLoader([1, 2, 3])
    it = iter(loader)
    assert next(it) == 1
    state = loader.state_dict()
    other = ListLoader([1, 2, 3])
    other.load_state_dict(state)
    assert list(other) == [2, 3]


# -- running train/main.py ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "train" / "main.py"
DEBUG_TOML = ROOT / "train" / "configs" / "debug.toml"


def fast_tokenizer_dir(base: Path) -> Path:
    """The debug tokenizer saved as tokenizer.json files: loads in well under a second in each subprocess."""
    from dualtower.model.config import flavor
    from dualtower.tokenizer import load_tokenizer

    target = base / "tokenizer"
    if not (target / "tokenizer.json").is_file():
        load_tokenizer(tokenizer_id=flavor("debug").tokenizer_id).save_pretrained(str(target))
    return target


def small_run_args(run_dir: Path, tokenizer_dir: Path, steps: int, *extra: str) -> list[str]:
    """CLI arguments for a few fast debug steps on the CPU."""
    return [
        "--config",
        str(DEBUG_TOML),
        f"--job.run_dir={run_dir}",
        f"--model.tokenizer_id={tokenizer_dir}",
        "--data.rows_per_batch=2",
        "--data.max_tokens_per_row=128",
        "--data.shuffle_buffer=16",
        "--data.num_workers=0",
        f"--training.steps={steps}",
        "--schedule.warmup_steps=2",
        "--metrics.log_every=1",
        "--metrics.progress=line",
        "--eval.at_end=false",
        "--eval.every=0",
        "--checkpoint.export_final=false",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]  # a running job may be halfway through its last line
    return [json.loads(line) for line in complete if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the last record logged for that step."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
