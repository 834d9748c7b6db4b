"""Float dtypes by the names configs and files use ("float16", "bfloat16", "float32"), and a finiteness check."""
from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = tuple(DTYPES)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or ±Inf in x: its max and min are finite (both reductions propagate NaN). Unlike
    torch.isfinite(x).all(), no temporaries of x's size (for a 28672² Hessian those would be 5 GB)."""
    return x.numel() == 0 or bool(torch.isfinite(x.amax()) & torch.isfinite(x.amin()))
