"""dualtower_kernels: Triton kernels for DualTowerVLM, each with a pure-PyTorch twin of the same signature."""
