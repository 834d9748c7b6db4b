"""Triton dequant-GEMM kernels (installed as `llmq.kernels`), one per file, each with a torch reference.

`triton_why_not(scheme, shape, device)` says why the triton backend cannot serve a layer (None = it can).
"""
from __future__ import annotations


def triton_why_not(scheme, shape, device) -> str | None:
    return "this layer: the Triton kernels are not implemented yet (llmq.kernels)"


def repack_for_triton(qw):
    raise NotImplementedError("llmq.kernels: Triton kernels are not implemented yet")


def triton_matmul(x2, packed):
    raise NotImplementedError("llmq.kernels: Triton kernels are not implemented yet")
