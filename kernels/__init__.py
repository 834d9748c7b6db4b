"""Triton dequant-GEMM kernels (installed as `llmq.kernels`), one per file, each with a torch reference.

    layout.py   the kernels' weight layout (repacked once at load) and the torch reference matmul
    dequant.py  the shared in-register dequantization of a W tile (int 2/3/4/8, NF4/NF3, double-quant scales)
    skinny.py   split-K kernel for M <= 16 (decode)
    gemm.py     tiled kernel for larger M

`triton_why_not(scheme, shape, device)` says why the triton backend cannot serve a layer (None = it can);
`repack_for_triton(qw)` and `triton_matmul(x2, packed)` are QuantLinear's hooks. Kernels run on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter: for tests).
"""
from __future__ import annotations

import os

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton ships with torch on Linux x86_64 / aarch64
        return f"Triton is not installed ({e}); pip install triton"
    return None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_why_not(scheme, shape, device) -> str | None:
    why = _triton_import_error()
    if why:
        return f"this layer: {why}"
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        return f"this layer: tensors on {device} (the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if scheme.format == "int" and scheme.bits not in (2, 3, 4, 8):
        return f"this layer: {scheme.bits}-bit codes"
    return None


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


def repack_for_triton(qw) -> dict:
    from .layout import repack

    tw = repack(qw)
    # the tensors are listed too, so QuantLinear registers them (get_memory_footprint counts them)
    return {"triton": tw, **{f"triton_{k}": v for k, v in tw.tensors().items()}}


def triton_matmul(x2: torch.Tensor, packed: dict) -> torch.Tensor:
    """x2 [M, K] -> [M, N]: the skinny split-K kernel for M <= 16, the tiled GEMM above."""
    from .gemm import gemm
    from .skinny import MAX_M, skinny

    x2 = x2.contiguous()
    tw = packed["triton"]
    if interpreted():  # the interpreter cannot time configs for the autotuner: one fixed small tile
        if x2.shape[0] <= MAX_M:
            return skinny(x2, tw, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})
        return gemm(x2, tw, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
    return skinny(x2, tw) if x2.shape[0] <= MAX_M else gemm(x2, tw)
