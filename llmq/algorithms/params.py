"""Group parameters, shared by RTN and GPTQ: the scale (and zero point) of every group, and encoding against the
scales as stored. Pure functions."""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..formats import grid, grouping, scales
from . import clipping


def group_params(
    W: torch.Tensor, scheme: QuantScheme, keep: torch.Tensor | None = None, col_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero [Rs, G] (fp32) of W [R, C] for `scheme`, ignoring weights where keep [R, C] is False.

    Uses the clipping search when the scheme asks for it; `col_weight` [C] weights its error per column.
    """
    Wg, mask = grouping.to_groups(W, scheme.group_size)
    if keep is not None:
        kg, _ = grouping.to_groups(keep.to(torch.uint8), scheme.group_size)
        mask = kg.bool() if mask is None else kg.bool() & mask
    if not scheme.clip_search:
        return grid(scheme).find_params(Wg, mask, scheme)
    cw = None
    if col_weight is not None:
        cw = grouping.to_groups(col_weight.reshape(1, -1), scheme.group_size)[0].reshape(Wg.shape[1:])
        if scheme.group_size == grouping.PER_TENSOR:  # per tensor: every row repeats the column weights
            cw = col_weight.repeat(W.shape[0]).reshape(Wg.shape[1:])
    return clipping.search_params(Wg, mask, scheme, cw)


def store_params(scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme):
    """Group parameters as they will be stored: (effective scales, effective zeros / offsets, stored tensors).

    Integer zero points are stored exactly; a llama.cpp block format rounds its scales and offsets to its blocks."""
    if scheme.block is not None:
        return scheme.block.store(scale, zero)
    eff, stored = scales.store(scale, scheme)
    return eff, zero, stored


def quantize_with_params(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Store the scales, then encode all of W [R, C] with the stored (effective) scales.

    Returns (codes [R, C] uint8, effective scales [Rs, G], stored scale tensors)."""
    eff, zero, stored = store_params(scale, zero, scheme)
    s = grouping.expand(eff, tuple(W.shape), scheme.group_size)
    z = None if zero is None else grouping.expand(zero, tuple(W.shape), scheme.group_size)
    return grid(scheme).encode(W, s, z, scheme), eff, stored
