"""Uniform integer grids, 2/3/4/8 bits, symmetric or asymmetric.

Asymmetric (GPTQ convention): the range [min(w, 0), max(w, 0)] of a group maps onto 0..maxq with
scale s = (max - min) / maxq and an integer zero point z = round(-min / s); q = clamp(round(w/s) + z).
Symmetric: s = 2·max|w| / maxq and z = 2**(bits-1), fixed and not stored (GPTQ's `sym`), so the grid
is -2**(bits-1)·s … (2**(bits-1)-1)·s. Dequantization is s·(q - z) in both cases; the error is at most
s/2 for every weight inside the (possibly clipped) range.
"""
from __future__ import annotations

import torch


def find_params(
    Wg: torch.Tensor, mask: torch.Tensor | None, scheme, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Wg [Rs, G, L] -> (scale [Rs, G] fp32, zero [Rs, G] fp32 integer-valued, or None when symmetric).

    `shrink` (scalar or [Rs, G]) scales the range down, for clipping search.
    """
    maxq = scheme.maxq
    if scheme.sym:
        a = Wg.abs() if mask is None else Wg.abs().masked_fill(~mask, 0)
        amax = a.amax(dim=-1) * shrink
        scale = 2 * amax / maxq
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo = Wg if mask is None else Wg.masked_fill(~mask, float("inf"))
    hi = Wg if mask is None else Wg.masked_fill(~mask, float("-inf"))
    xmin = lo.amin(dim=-1).clamp(max=0) * shrink
    xmax = hi.amax(dim=-1).clamp(min=0) * shrink
    scale = (xmax - xmin) / maxq
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def zero_point(zero: torch.Tensor | None, scheme) -> torch.Tensor | float:
    return float(1 << (scheme.bits - 1)) if zero is None else zero


def encode(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme) -> torch.Tensor:
    """Codes (uint8) of W for broadcastable scale/zero (fp32)."""
    z = zero_point(zero, scheme)
    return torch.clamp(torch.round(W / scale) + z, 0, scheme.maxq).to(torch.uint8)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme) -> torch.Tensor:
    z = zero_point(zero, scheme)
    return scale * (q.to(torch.float32) - z)


def fake_quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme) -> torch.Tensor:
    """decode(encode(W)) bit for bit (the codes are integers in [0, maxq], exact in fp32), in one buffer:
    ~10x faster than through uint8 codes (measured on a 576 x 1536 weight: 0.4 vs 4.1 ms)."""
    z = zero_point(zero, scheme)
    return (W / scale).round_().add_(z).clamp_(0, scheme.maxq).sub_(z).mul_(scale)
