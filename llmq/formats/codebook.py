"""Absmax-scaled codebooks: the arithmetic every codebook format shares (the tables: nf.py and its siblings).

Each group is scaled by its absolute maximum s = max|w| into [-1, 1]; each weight takes the code of the nearest
codebook value (ties to the lower value); dequantization is s·values[q]. `values` is indexed by code and may hold
a value twice (a float format's +0 and -0): encoding then emits the lowest such code.
"""
from __future__ import annotations

import torch


class Codebook:
    def __init__(self, values: torch.Tensor):
        self.values = values.to(torch.float32)  # [2**bits], code -> value
        self.bits = len(values).bit_length() - 1
        if len(values) != 1 << self.bits:
            raise ValueError(f"a codebook needs 2**bits values, got {len(values)}")
        order = torch.sort(self.values, stable=True).indices
        s = self.values[order]
        first = torch.ones(len(s), dtype=torch.bool)
        first[1:] = s[1:] != s[:-1]  # drop repeated values, keeping their lowest code
        self._sorted, self._code = s[first], order[first].to(torch.uint8)
        self._midpoints = (self._sorted[1:] + self._sorted[:-1]) / 2
        self._identity = torch.equal(self._code, torch.arange(len(self.values), dtype=torch.uint8))

    def find_params(self, Wg: torch.Tensor, mask: torch.Tensor | None, scheme,
                    shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, None]:  # fmt: skip
        """Wg [Rs, G, L] -> (absmax scale [Rs, G] fp32, None)."""
        a = Wg.abs() if mask is None else Wg.abs().masked_fill(~mask, 0)
        scale = a.amax(dim=-1) * shrink
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None

    def encode(self, W: torch.Tensor, scale: torch.Tensor, zero: None, scheme) -> torch.Tensor:
        x = (W / scale).contiguous()
        idx = torch.bucketize(x, self._midpoints.to(x.device))  # index into the sorted distinct values
        return idx.to(torch.uint8) if self._identity else self._code.to(x.device)[idx]

    def decode(self, q: torch.Tensor, scale: torch.Tensor, zero: None, scheme) -> torch.Tensor:
        return self.values.to(q.device)[q.long()] * scale
