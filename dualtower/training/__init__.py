"""Training: optimizer and schedule, the trainer loop, checkpoints, metrics, evaluation and profiling."""

from dualtower.training.assemble import build_trainer
from dualtower.training.build import build_heldout, build_model
from dualtower.training.checkpoint import Checkpointer, export_pretrained, full_model_copy
from dualtower.training.evaluate import Evaluator
from dualtower.training.flops import FlopCounter, peak_flops
from dualtower.training.metrics import MetricsLogger
from dualtower.training.optim import apply_freezing, build_optimizer, param_groups
from dualtower.training.profiling import StepProfiler
from dualtower.training.schedule import build_scheduler, lr_multiplier
from dualtower.training.trainer import NonFiniteLossError, Trainer, TrainerParts

__all__ = [
    "Checkpointer",
    "Evaluator",
    "FlopCounter",
    "MetricsLogger",
    "NonFiniteLossError",
    "StepProfiler",
    "Trainer",
    "TrainerParts",
    "apply_freezing",
    "build_heldout",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "export_pretrained",
    "full_model_copy",
    "lr_multiplier",
    "param_groups",
    "peak_flops",
]
