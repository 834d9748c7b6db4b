"""NormalFloat codebooks: NF4 of QLoRA (Dettmers et al. 2023, appendix E), NF3 built the same way, and NF2.

The arithmetic (absmax scales, nearest value) is formats/codebook.py's; this module holds the tables. NF4 and
NF3 hold an exact zero; NF2 does not.

A k-bit NormalFloat codebook holds 2^(k-1) positive and 2^(k-1) - 1 negative quantiles of N(0, 1), equally
spaced in probability between 1/2 and QLoRA's offset 0.9677083 (Φ⁻¹ of linspace(offset, 1/2, 2^(k-1) + 1) and
of linspace(offset, 1/2, 2^(k-1)), last points dropped), plus 0, divided by the largest magnitude. With k = 4
that is bitsandbytes' NF4 table; k = 3 gives the 8 values below (whose positive half is every other positive
NF4 value).

NF2 is not QLoRA's construction: at 2 bits that gives {-1, 0, 0.338, 1}, an exact zero and a single negative
level. NF2 is the symmetric table {-1, -1/4, 1/4, 1} (no zero: the 4-level quantizers that minimise the
squared error of a bell-shaped group have none). Its inner value 1/4 was chosen by measurement, and NF2 is not
among the default mixed-precision candidates because whole models measured worse with it than with int2:
benchmarks/results/notes.md ("NF2") has the numbers.
"""
from __future__ import annotations

import torch

from .codebook import Codebook

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

NF4, NF3, NF2 = Codebook(NF4_CODEBOOK), Codebook(NF3_CODEBOOK), Codebook(NF2_CODEBOOK)
