"""The DualTowerVLM model in plain PyTorch (no parallelism, no compile)."""

from dualtower.model.config import FLAVORS, ModelConfig, flavor
from dualtower.model.dual_tower import DualTowerVLM

__all__ = ["FLAVORS", "DualTowerVLM", "ModelConfig", "flavor"]
