"""How per-group scales are stored: plain in `scale_dtype`, or double-quantized (formats/doublequant.py).

`store(scale, scheme)` returns both what is written and what dequantization will use, so that an algorithm
encodes its weights against exactly the stored scales. Stored scales are rounded up (never down) to their
storage grid, so every weight inside a group's (possibly clipped) range stays within half a step of a grid point.
"""
from __future__ import annotations

import torch

from ..dtypes import DTYPES
from ..errors import LlmqError
from . import doublequant


def store(scale: torch.Tensor, scheme) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fp32 scales [Rs, G] -> (the scales dequantization will actually use, fp32; tensors to store)."""
    if scheme.double_quant:
        q, step, off = doublequant.quantize(scale)
        stored = {"scales_q": q, "scales_step": step, "scales_off": off}
        eff = doublequant.dequantize(q, step, off)
    else:
        s = scale.to(DTYPES[scheme.scale_dtype])
        # round up, never down: a smaller stored scale would leave the range's ends off the grid
        s = torch.where(s.to(torch.float32) < scale, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        if not torch.isfinite(s).all():
            raise LlmqError(
                f"a group scale overflows {scheme.scale_dtype} (max {scale.max().item():.3g}); "
                "use scale_dtype='float32' or 'bfloat16'"
            )
        stored, eff = {"scales": s}, s.to(torch.float32)
    eff = torch.where(eff > 0, eff, torch.full_like(eff, torch.finfo(torch.float32).tiny))
    return eff, stored


def layout(scheme, Rs: int, G: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored scale tensors for [Rs, G] groups: suffix -> (dtype, shape)."""
    if scheme.double_quant:
        nb = doublequant.n_blocks(Rs)
        return {"scales_q": (torch.uint8, (Rs, G)), "scales_step": (torch.float32, (G, nb)),
                "scales_off": (torch.float32, (G, nb))}  # fmt: skip
    return {"scales": (DTYPES[scheme.scale_dtype], (Rs, G))}


def effective(parts: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """The fp32 scales [Rs, G] that stored `parts` stand for."""
    if scheme.double_quant:
        return doublequant.dequantize(parts["scales_q"], parts["scales_step"], parts["scales_off"])
    return parts["scales"].to(torch.float32)
