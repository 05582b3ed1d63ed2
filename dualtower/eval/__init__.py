"""Evaluation: the lmms-eval plugin (`lmms_plugin`, needs the `eval` extra; registered through `lmms_manifest`
or `LMMS_EVAL_PLUGINS=dualtower.eval`, see `models/` and `tasks/`), the offline MMStar scorer (`offline`,
`mmstar_synthetic` builds a local test file), MMStar letter extraction and scoring (`mmstar`), per-benchmark
prompts (`prompts`), CIDEr-D and VQA accuracy (`metrics`) and the model runner they share (`runner`).

Nothing here imports lmms-eval until `dualtower.eval.lmms_plugin` is imported.
"""
