"""Round-to-nearest: every weight to the nearest point of its group's grid. A pure function."""
from __future__ import annotations

import torch

from ..config import QuantScheme
from ..qtensor import QuantizedWeight, check_block_shape
from . import outliers
from .params import group_params, quantize_with_params


def rtn(W: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """W [out, in] -> QuantizedWeight. Outliers (if any) are the largest |w|, kept exact and left out of
    their group's range."""
    W = W.detach().to(torch.float32)
    check_block_shape(tuple(W.shape), scheme)
    exact = outliers.by_magnitude(W, scheme.outliers) if scheme.outliers > 0 else None
    scale, zero = group_params(W, scheme, None if exact is None else ~exact)
    codes, _, stored = quantize_with_params(W, scale, zero, scheme)
    return QuantizedWeight.build(codes, stored, zero, scheme, None if exact is None else (exact, W))
