"""FP4 (E2M1): the 4-bit float of the QLoRA paper, bitsandbytes and the OCP microscaling formats, absmax-scaled.

A code is the E2M1 bit pattern s·e1·e0·m: sign, two exponent bits, one mantissa bit, exponent bias 1, with
e = 0 subnormal. Its magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}; divided by 6 so that the group's absmax maps
to the largest one. Code 0b1000 is -0: never emitted (formats/codebook.py encodes a value held twice with its
lowest code), decoded as 0. Against NF4, whose levels follow a normal distribution, FP4's are denser near 0 and
sparser at the tails (benchmarks/results/fp4.md measures both).
"""
from __future__ import annotations

import torch

from .codebook import Codebook

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0b0000 .. 0b0111
FP4_CODEBOOK = torch.tensor([m / 6.0 for m in E2M1] + [-m / 6.0 for m in E2M1], dtype=torch.float32)

FP4 = Codebook(FP4_CODEBOOK)
