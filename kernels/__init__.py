"""dualtower_kernels: Triton kernels for DualTowerVLM, each with a pure-PyTorch twin of the same signature.

One family per module, registered as `torch.library` custom ops (namespace `dualtower`) so torch.compile
traces through them: prefix_attention (cross-tower and causal varlen attention, forward + backward), projector
(pixel shuffle folded into the GEMM), linear_cross_entropy (no (tokens x vocab) logits), decode_attention
(split-K over the static cache). `dualtower.ops` picks between them and the twins at run time.
"""
