"""lmms-eval's CLI adds `<plugin>.tasks` to its task search path when `LMMS_EVAL_PLUGINS` names a plugin, and
fails if the package is missing. DualTowerVLM uses lmms-eval's own tasks, so this folder holds no task yet.
"""
