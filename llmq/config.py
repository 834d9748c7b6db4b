"""Frozen, validated configuration dataclasses: one per concern.

Every field is checked in `__post_init__`, so a bad value fails where it is written, with a message that
names the field, the value and the allowed values.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LlmqError

FORMATS = ("int", "nf4", "nf3", "nf2")
NF_BITS = {"nf4": 4, "nf3": 3, "nf2": 2}  # absmax-scaled codebooks (formats/nf.py) and their code widths
INT_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
PER_CHANNEL = -1  # group_size for one scale per output row
PER_TENSOR = 0  # group_size for one scale for the whole matrix
DQ_BLOCK = 256  # double quantization: scales re-quantized in blocks of this many


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LlmqError(msg)


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight is quantized.

    bits:         code width; 2, 3, 4 or 8 for `int`, 4 for `nf4`, 3 for `nf3`, 2 for `nf2` (None: 4 for
                  `int`, else the codebook's width).
    format:       "int" (uniform grid), "nf4" (QLoRA's 16-value NormalFloat codebook, absmax-scaled), "nf3"
                  (its 8-value counterpart) or "nf2" (a symmetric 4-value codebook), formats/nf.py.
    group_size:   columns sharing one scale: >= 16 (need not divide in_features: the last group is
                  shorter), -1 = per output channel, 0 = per tensor.
    sym:          int only: symmetric grid (zero point fixed at 2**(bits-1), not stored) or asymmetric
                  (an integer zero point per group, stored packed at `bits`). nf4/nf3/nf2 are always symmetric.
    double_quant: per-group scales re-quantized to uint8 in blocks of 256 (one fp32 scale and offset per
                  block), as QLoRA does.
    scale_dtype:  storage dtype of plain (not double-quantized) scales.
    clip_search:  per group, shrink the range over a grid and keep the scale with least squared error.
    outliers:     fraction of weights kept exact in fp16, stored sparse (0 = none).
    """

    bits: int | None = None
    format: str = "int"
    group_size: int = 128
    sym: bool = False
    double_quant: bool = False
    scale_dtype: str = "float16"
    clip_search: bool = False
    outliers: float = 0.0

    def __post_init__(self) -> None:
        _check(self.format in FORMATS, f"format={self.format!r} is not supported; use one of {FORMATS}")
        if self.bits is None:
            object.__setattr__(self, "bits", NF_BITS.get(self.format, 4))
        if self.format in NF_BITS:
            nb = NF_BITS[self.format]
            _check(self.bits == nb, f"format={self.format!r} is a {nb}-bit codebook; got bits={self.bits}, "
                   f"use bits={nb}")
            object.__setattr__(self, "sym", True)
        _check(self.bits in INT_BITS, f"bits={self.bits} is not supported; use one of {INT_BITS}")
        gs = self.group_size
        _check(
            isinstance(gs, int) and (gs in (PER_CHANNEL, PER_TENSOR) or gs >= 16),
            f"group_size={gs!r} is not supported; use a group of >= 16 columns (32, 64, 128, 256 are usual), "
            "-1 for per-output-channel or 0 for per-tensor",
        )
        _check(self.scale_dtype in SCALE_DTYPES, f"scale_dtype={self.scale_dtype!r}; use one of {SCALE_DTYPES}")
        _check(
            0.0 <= self.outliers < 0.5,
            f"outliers={self.outliers} must be a fraction of weights in [0, 0.5), e.g. 0.005 for 0.5%",
        )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def describe(self) -> str:
        """A short human name, e.g. 'int4-asym-g128', 'nf4-g64-dq'."""
        g = {PER_CHANNEL: "pc", PER_TENSOR: "pt"}.get(self.group_size, f"g{self.group_size}")
        name = self.format if self.format in NF_BITS else f"int{self.bits}-{'sym' if self.sym else 'asym'}"
        extra = "".join(
            s for s, on in (("-dq", self.double_quant), ("-clip", self.clip_search)) if on
        ) + (f"-out{self.outliers:g}" if self.outliers else "")
        return f"{name}-{g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown quantization scheme fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


GPTQ_INPUTS = ("quantized", "fp")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022) options.

    damp:          added to diag(H) as a fraction of its mean (paper: 0.01).
    block_size:    columns per lazy batch update (paper: 128).
    act_order:     process columns by decreasing diag(H).
    static_groups: with act_order, fix group scales from the unquantized weight before the loop, so the
                   stored layout needs no permutation or per-column group index. False with act_order
                   stores the permutation instead.
    max_damp_tries: a Hessian that is not positive definite gets 10x more damping, this many times, then
                   an error.
    inputs:        whose activations each linear's H comes from. "quantized" (the paper's and AutoGPTQ's
                   way): the inputs the already-quantized layers (and groups of this layer) produce.
                   "fp": the full-precision model's own inputs, so every linear is fitted to reproduce
                   the fp model on fp activations (the sensitivity table's weights are exactly these).
                   On SmolLM2-135M "fp" is 3.6-12.6% lower in perplexity from 2 to 4 bits and twice as
                   fast (benchmarks/results/gptq_inputs.md); "quantized" stays the default until that is
                   measured on larger models.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    max_damp_tries: int = 4
    inputs: str = "quantized"

    def __post_init__(self) -> None:
        _check(0.0 < self.damp <= 1.0, f"damp={self.damp} must be in (0, 1]; 0.01 is the paper's value")
        _check(self.block_size >= 1, f"block_size={self.block_size} must be >= 1")
        _check(self.max_damp_tries >= 0, f"max_damp_tries={self.max_damp_tries} must be >= 0")
        _check(self.inputs in GPTQ_INPUTS, f"inputs={self.inputs!r} is not known; use one of {', '.join(GPTQ_INPUTS)}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: `nsamples` windows of `seqlen` tokens drawn (seeded) from `source`.

    source: a .txt/.jsonl file, a wikitext-2-raw dir, a dataset name, or None for the local WikiText-2.
    token_range: the fraction [lo, hi) of the token stream windows are drawn from, e.g. (0.5, 1.0) to keep
    the first half of a split for evaluation.
    """

    source: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    split: str = "train"
    token_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        _check(self.nsamples >= 1, f"nsamples={self.nsamples} must be >= 1")
        _check(self.seqlen >= 2, f"seqlen={self.seqlen} must be >= 2")
        lo, hi = self.token_range
        _check(0.0 <= lo < hi <= 1.0, f"token_range={self.token_range} must satisfy 0 <= lo < hi <= 1")


@dataclass(frozen=True)
class RowSplit:
    """One linear quantized with several schemes, output row by output row (mixed precision per output
    channel, llmq/allocate.py): row r uses schemes[part[r]]. Every scheme is used by at least one row."""

    schemes: tuple[QuantScheme, ...]
    part: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.schemes)
        _check(1 <= n <= 255, f"a row split needs 1 to 255 schemes, got {n}")
        used = set(self.part)
        _check(used == set(range(n)), f"a row split's rows must use every one of its {n} schemes and no other "
               f"(rows use {sorted(used)[:8]})")  # fmt: skip

    def rows(self, k: int) -> list[int]:
        """The output rows of piece k, in increasing order."""
        return [r for r, p in enumerate(self.part) if p == k]


@dataclass(frozen=True)
class QuantPlan:
    """A default scheme plus per-module overrides (exact module names), and linears split by output row."""

    default: QuantScheme = field(default_factory=QuantScheme)
    overrides: dict[str, QuantScheme] = field(default_factory=dict)
    row_splits: dict[str, RowSplit] = field(default_factory=dict)

    def scheme_for(self, name: str) -> QuantScheme:
        return self.overrides.get(name, self.default)


def scheme_from_name(name: str, **defaults: Any) -> QuantScheme:
    """Parse a scheme name as `QuantScheme.describe()` writes it, e.g. 'int4-g128', 'int3-asym-g64-dq',
    'nf4-g64', 'nf3-g64-dq', 'nf2-g64-dq', 'int8-pc', 'int4-sym-g128-clip-out0.005'. `defaults` fill the fields
    the name leaves out."""
    parts = name.strip().lower().split("-")
    m = re.fullmatch(r"(int([2348])|nf[234])", parts[0])
    _check(m is not None and len(parts) >= 2, f"scheme name {name!r} not understood; write e.g. int4-g128, "
           "int3-g64-dq, nf4-g64, nf3-g64-dq, int8-pc, int4-g128-out0.005")  # fmt: skip
    kw: dict[str, Any] = dict(defaults)
    fmt = parts[0] if parts[0] in NF_BITS else "int"
    kw |= {"format": fmt, "bits": NF_BITS.get(fmt) or int(m.group(2))}
    for p in parts[1:]:
        if p in ("sym", "asym"):
            kw["sym"] = p == "sym"
        elif p in ("pc", "pt"):
            kw["group_size"] = PER_CHANNEL if p == "pc" else PER_TENSOR
        elif re.fullmatch(r"g\d+", p):
            kw["group_size"] = int(p[1:])
        elif p in ("dq", "clip"):
            kw["double_quant" if p == "dq" else "clip_search"] = True
        elif re.fullmatch(r"out\d*\.?\d+(e-?\d+)?", p):
            kw["outliers"] = float(p[3:])
        else:
            raise LlmqError(f"scheme name {name!r}: part {p!r} not understood; known parts: sym, asym, gN, pc, pt, "
                            "dq, clip, outFRACTION")  # fmt: skip
    return QuantScheme(**kw)


# Candidates for mixed precision (--target-bpw): 2/3/4/8 bits x group sizes, double-quantized scales, NF3/NF4, and
# outliers; each fills a different point of the size ladder (measured bits per weight on SmolLM2):
# int2 g64 2.30 < g32-dq 2.34 < g32 2.58; nf3 g256-dq 3.04 < g128-dq 3.07 < g64-dq 3.13 < g32-dq 3.26; int3 g32-dq
# 3.38; nf4 g128-dq 4.07 < g64-dq 4.13 < g32-dq 4.26 < g32 4.5; int8 g128 8.2. Left out because on SmolLM2 another
# candidate has less estimated damage at the same or lower size (benchmarks/results/mixed.md): int3 pc / g128-dq /
# g64-dq (NF3 g256-dq / g128-dq / g64-dq), int3 g128 / g64 / g32 (the -dq variants), int4 pc / g128 / g64 / g32
# (NF4 with double quant).
DEFAULT_CANDIDATES = ("int2-g64", "int2-g32-dq", "int2-g32", "nf3-g256-dq", "nf3-g128-dq", "nf3-g64-dq", "nf3-g32-dq",
                      "int3-g32-dq", "nf4-g128-dq", "nf4-g64-dq", "nf4-g32-dq", "nf4-g32", "int8-g128",
                      "int3-g128-out0.005", "int4-g128-out0.005")  # fmt: skip
# Candidates when schemes are chosen per output row (--granularity row): one per code width, so a linear has at most
# 4 pieces (each piece is one kernel call); outliers are not allowed there (their count is known only after GPTQ).
DEFAULT_ROW_CANDIDATES = ("int2-g32-dq", "nf3-g128-dq", "nf4-g128-dq", "int8-g128")
