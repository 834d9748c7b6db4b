"""The `triton` backend: the fused dequant-GEMM kernels of llmq.kernels, on CUDA (or on the CPU under
TRITON_INTERPRET=1, Triton's interpreter, for tests). The kernel modules (gemm, skinny) are imported when first
used: Triton is optional and slow to import, and a CPU-only `import llmq` never needs it."""
from __future__ import annotations

import torch

from llmq.kernels import interpreted
from llmq.kernels.layout import repack as to_kernel_layout

NAME = "triton"


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton ships with torch on Linux x86_64 / aarch64
        return f"Triton is not installed ({e}); pip install triton"
    return None


def why_not(scheme, shape: tuple[int, int], device: torch.device) -> str | None:
    why = _triton_import_error()
    if why:
        return f"this layer: {why}"
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        return f"this layer: tensors on {device} (the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if scheme.block is not None:
        return f"this layer: {scheme.format} is llama.cpp's block layout"
    lookup = scheme.number_format.codebook is not None
    if (lookup and scheme.bits > 4) or (not lookup and scheme.bits not in (2, 3, 4, 8)):
        return f"this layer: {scheme.bits}-bit {'codebook ' if lookup else ''}codes"
    return None


def repack(qw) -> dict:
    tw = to_kernel_layout(qw)
    # the tensors are listed too, so QuantLinear registers them (get_memory_footprint counts them)
    return {"triton": tw, **{f"triton_{k}": v for k, v in tw.tensors().items()}}


def matmul(x2: torch.Tensor, packed: dict) -> torch.Tensor:
    """x2 [M, K] -> [M, N]: the skinny split-K kernel for M <= 16, the tiled GEMM above."""
    from llmq.kernels.gemm import gemm
    from llmq.kernels.skinny import MAX_M, skinny

    x2 = x2.contiguous()
    tw = packed["triton"]
    if interpreted():  # the interpreter cannot time configs for the autotuner: one fixed small tile
        if x2.shape[0] <= MAX_M:
            return skinny(x2, tw, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})
        return gemm(x2, tw, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
    return skinny(x2, tw) if x2.shape[0] <= MAX_M else gemm(x2, tw)
