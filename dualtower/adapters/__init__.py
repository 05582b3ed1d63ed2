"""Weight adapters: key maps from other checkpoint formats onto DualTowerVLM."""
