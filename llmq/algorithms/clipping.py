"""Clipping (range-shrink) search for group scales: a pure function.

For each group, try shrinking its range by p ∈ {1, 1-step, …, min_shrink} and keep the p whose
quantize→dequantize has the least (optionally column-weighted) squared error. Weights outside the
shrunk range clip to the grid's end; for heavy-tailed groups the finer step pays for that.
"""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..formats import grid

MIN_SHRINK = 0.2
STEP = 0.02


def search_params(
    Wg: torch.Tensor,
    mask: torch.Tensor | None,
    scheme: QuantScheme,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Wg [Rs, G, L], mask broadcastable to it (True = counts), col_weight [G, L] or None.

    Returns (scale [Rs, G], zero [Rs, G] or None) of the best shrink per group.
    """
    g = grid(scheme)
    keep = torch.ones((), dtype=torch.bool) if mask is None else mask
    w = keep.to(Wg.dtype) if col_weight is None else keep.to(Wg.dtype) * col_weight
    best_err = torch.full(Wg.shape[:2], float("inf"), device=Wg.device)
    best_scale, best_zero = g.find_params(Wg, mask, scheme)
    # every candidate's parameters from one call (the group ranges, masked or not, reduced once): [n, Rs, G]
    n = int(round((1.0 - MIN_SHRINK) / STEP)) + 1
    shrinks = torch.tensor([1.0 - i * STEP for i in range(n)], dtype=torch.float32, device=Wg.device)
    scales, zeros = g.find_params(Wg, mask, scheme, shrink=shrinks.view(n, 1, 1))
    for i in range(n):
        scale, zero = scales[i], None if zeros is None else zeros[i]
        s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        d = g.quantize_dequantize(Wg, s, z, scheme)  # a fresh tensor: the error is formed in place
        err = d.sub_(Wg).square_().mul_(w).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
