"""The `reference` backend: dequantize the weight, then an ordinary matmul. Serves every scheme on every device;
the last choice of every device's preference list, and the yardstick the other backends are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "reference"


def why_not(scheme, shape: tuple[int, int], device: torch.device) -> str | None:
    return None


def repack(qw) -> dict:
    """Nothing to precompute: keep the packed weight itself (dequantized anew at every call)."""
    return {"weight": qw}


def matmul(x2: torch.Tensor, packed: dict) -> torch.Tensor:
    """x2 [M, K] (stored column order) -> [M, N] in x2's dtype."""
    return F.linear(x2, packed["weight"].dequantize_stored(x2.dtype, outliers=False))
