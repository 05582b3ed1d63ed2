"""lmms-eval's registration payload for the `dualtower` model, kept free of heavy imports.

lmms-eval (>= 0.7) loads entry points of the group `lmms_eval.models` while its model registry is being
built, so this module must not import `lmms_eval.models` (nor torch): it only names the class.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "dualtower"
CLASS_PATH = "dualtower.eval.lmms_plugin.DualTowerLMMS"


def manifests() -> list[Any]:
    """The entry point `dualtower = "dualtower.eval.lmms_manifest:manifests"` of group `lmms_eval.models`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("dualtower_vlm",))]
