"""Where `LMMS_EVAL_PLUGINS=dualtower.eval` looks for the `dualtower` model class."""

from dualtower.eval.lmms_plugin import DualTowerLMMS

__all__ = ["DualTowerLMMS"]
