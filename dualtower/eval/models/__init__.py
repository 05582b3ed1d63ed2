"""`LMMS_EVAL_PLUGINS=dualtower.eval`: lmms-eval imports `dualtower.eval.models` and reads AVAILABLE_MODELS.

The class of model `name` must live at `dualtower.eval.models.<name>.<class>`.
"""

AVAILABLE_MODELS = {"dualtower": "DualTowerLMMS"}
