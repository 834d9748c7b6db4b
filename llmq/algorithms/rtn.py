"""Round-to-nearest: every weight to the nearest point of its group's grid. A pure function."""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..formats import grid, grouping
from ..qtensor import QuantizedWeight, quantize_with_params
from . import clipping, outliers


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
        if scheme.group_size == 0:  # per tensor: every row repeats the column weights
            cw = col_weight.repeat(W.shape[0]).reshape(Wg.shape[1:])
    return clipping.search_params(Wg, mask, scheme, cw)


def rtn(W: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """W [out, in] -> QuantizedWeight. Outliers (if any) are the largest |w|, kept exact and left out of
    their group's range."""
    W = W.detach().to(torch.float32)
    exact = outliers.by_magnitude(W, scheme.outliers) if scheme.outliers > 0 else None
    scale, zero = group_params(W, scheme, None if exact is None else ~exact)
    codes, _, stored = quantize_with_params(W, scale, zero, scheme)
    return QuantizedWeight.build(codes, stored, zero, scheme, None if exact is None else (exact, W))
