"""Triton dequant-GEMM kernels (installed as `llmq.kernels`), one per file, each with a torch reference."""
