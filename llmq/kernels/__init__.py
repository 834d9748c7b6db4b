"""Triton dequant-GEMM kernels (installed as `llmq.kernels`), one per file, each with a torch reference.

    layout.py   the kernels' weight layout (repacked once at load) and the torch reference matmul
    dequant.py  the shared in-register dequantization of a W tile (int 2/3/4/8, NF4/NF3, double-quant scales)
    skinny.py   split-K kernel for M <= 16 (decode)
    gemm.py     tiled kernel for larger M

QuantLinear reaches them through the `triton` backend (llmq/backends/triton.py). Kernels run on CUDA tensors, or
on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter: for tests).
"""
from __future__ import annotations

import os

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_inputs(x: torch.Tensor, tw) -> None:
    """Precise ValueErrors for what the kernels cannot take."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != tw.K:
        raise ValueError(f"x has K = {x.shape[1]} columns, the weight has in_features K = {tw.K}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {ACT_DTYPES}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (strides {x.stride()}); call .contiguous()")
    if x.device != tw.qw.device:
        raise ValueError(f"x is on {x.device}, the weight on {tw.qw.device}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"x is on {x.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if x.shape[0] == 0:
        raise ValueError("x has M = 0 rows")
