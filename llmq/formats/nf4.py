"""NF4: the 4-bit NormalFloat codebook of QLoRA (Dettmers et al. 2023, appendix E).

Each group is scaled by its absolute maximum s = max|w| into [-1, 1]; each weight takes the index of the
nearest of the 16 code values (an exact zero included). Dequantization is s·NF4[q].
"""
from __future__ import annotations

import torch

from ..config import QuantScheme

NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230611801147, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


def find_params(
    Wg: torch.Tensor, mask: torch.Tensor | None, scheme: QuantScheme, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, None]:
    """Wg [Rs, G, L] -> (absmax scale [Rs, G] fp32, None)."""
    a = Wg.abs() if mask is None else Wg.abs().masked_fill(~mask, 0)
    scale = a.amax(dim=-1) * shrink
    return torch.where(scale > 0, scale, torch.ones_like(scale)), None


def encode(W: torch.Tensor, scale: torch.Tensor, zero: None, scheme: QuantScheme) -> torch.Tensor:
    x = (W / scale).contiguous()
    return torch.bucketize(x, _MIDPOINTS.to(x.device)).to(torch.uint8)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: None, scheme: QuantScheme) -> torch.Tensor:
    return NF4_CODEBOOK.to(q.device)[q.long()] * scale
