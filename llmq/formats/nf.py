"""Absmax-scaled codebooks: NF4 of QLoRA (Dettmers et al. 2023, appendix E), NF3 built the same way, and NF2.

Each group is scaled by its absolute maximum s = max|w| into [-1, 1]; each weight takes the index of the
nearest code value (NF4 and NF3 hold an exact zero; NF2 does not). Dequantization is s·NF[q].

A k-bit NormalFloat codebook holds 2^(k-1) positive and 2^(k-1) - 1 negative quantiles of N(0, 1), equally
spaced in probability between 1/2 and QLoRA's offset 0.9677083 (Φ⁻¹ of linspace(offset, 1/2, 2^(k-1) + 1) and
of linspace(offset, 1/2, 2^(k-1)), last points dropped), plus 0, divided by the largest magnitude. With k = 4
that is bitsandbytes' NF4 table; k = 3 gives the 8 values below (whose positive half is every other positive
NF4 value). On SmolLM2 NF3 with group-wise absmax scales has about the squared error of the asymmetric int3
grid at the same group size while storing no zero points (benchmarks/results/mixed.md has the perplexities).

NF2 is not QLoRA's construction: at 2 bits that gives {-1, 0, 0.338, 1}, an exact zero and a single negative
level. NF2 is the symmetric table {-1, -1/4, 1/4, 1} (no zero: the 4-level quantizers that minimise the
squared error of a bell-shaped group have none). Its inner value is measured: on SmolLM2 (GPTQ with clip
search, g64, expected-Fisher damage summed over all linears) 1/4 does 1.6% better than 0.2 and 4% better
than 0.3 (Lloyd-Max for N(0, 1) relative to its outer level); with absmax scales and the clip search it beats
the asymmetric int2 grid, whose integer zero point puts 0 on the grid and leaves one side a single level,
while storing no zero points (nf2-g32-dq: 2.26 bits per weight, 7% less estimated damage than int2-g32-dq
at 2.34). Measured as whole models it does not pay off: uniform GPTQ nf2-g32-dq 144.5 ppl vs int2-g32-dq 121.4,
and with NF2 in place of the int2 mixed-precision candidates mixed 3.0 / 3.5 / 4.0 measured 32.38 / 25.04 / 22.13
against 32.21 / 24.89 / 21.96, so config.DEFAULT_CANDIDATES keeps int2.
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
NF3_CODEBOOK = torch.tensor(
    [-1.0, -0.478629160115911, -0.21714181782574396, 0.0, 0.16093020141124725, 0.33791524171829224,
     0.5626170039176941, 1.0],
    dtype=torch.float32,
)  # fmt: skip
NF2_CODEBOOK = torch.tensor([-1.0, -0.25, 0.25, 1.0], dtype=torch.float32)
CODEBOOKS = {4: NF4_CODEBOOK, 3: NF3_CODEBOOK, 2: NF2_CODEBOOK}  # by code width
_MIDPOINTS = {b: (c[1:] + c[:-1]) / 2 for b, c in CODEBOOKS.items()}


def codebook(scheme: QuantScheme) -> torch.Tensor:
    """The code values of a codebook scheme, nf4 / nf3 / nf2 (fp32, on the CPU)."""
    return CODEBOOKS[scheme.bits]


def find_params(
    Wg: torch.Tensor, mask: torch.Tensor | None, scheme: QuantScheme, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, None]:
    """Wg [Rs, G, L] -> (absmax scale [Rs, G] fp32, None)."""
    a = Wg.abs() if mask is None else Wg.abs().masked_fill(~mask, 0)
    scale = a.amax(dim=-1) * shrink
    return torch.where(scale > 0, scale, torch.ones_like(scale)), None


def encode(W: torch.Tensor, scale: torch.Tensor, zero: None, scheme: QuantScheme) -> torch.Tensor:
    x = (W / scale).contiguous()
    return torch.bucketize(x, _MIDPOINTS[scheme.bits].to(x.device)).to(torch.uint8)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: None, scheme: QuantScheme) -> torch.Tensor:
    return codebook(scheme).to(q.device)[q.long()] * scale
