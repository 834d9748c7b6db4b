"""Frozen, validated configuration dataclasses: one per concern.

Every field is checked in `__post_init__`, so a bad value fails where it is written, with a message that
names the field, the value and the allowed values.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from . import formats
from .dtypes import DTYPE_NAMES
from .errors import LlmqError
from .formats.grouping import PER_CHANNEL, PER_TENSOR

SCALE_DTYPES = DTYPE_NAMES


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LlmqError(msg)


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight is quantized.

    bits:         code width: one the format stores (2, 3, 4 or 8 for `int`; a codebook's own width);
                  None: the format's default (4 for `int`).
    format:       a registered number format (llmq/formats/__init__.py): "int" (uniform grid), the absmax-scaled
                  codebooks ("nf4" for QLoRA's NormalFloat, ...): `formats.FORMATS` lists them.
    group_size:   columns sharing one scale: >= 16 (need not divide in_features: the last group is
                  shorter), -1 = per output channel, 0 = per tensor; None: 128, or the group a llama.cpp block
                  format fixes (q4_0 ... q6_k: 32 or 16).
    sym:          for formats with zero points (int): symmetric grid (zero point fixed at 2**(bits-1), not
                  stored) or asymmetric (an integer zero point per group, stored packed at `bits`). Codebook
                  formats are always symmetric.
    double_quant: per-group scales re-quantized to uint8 in blocks of 256 (one fp32 scale and offset per
                  block), as QLoRA does.
    scale_dtype:  storage dtype of plain (not double-quantized) scales.
    clip_search:  per group, shrink the range over a grid and keep the scale with least squared error.
    outliers:     fraction of weights kept exact in fp16, stored sparse (0 = none).
    """

    bits: int | None = None
    format: str = "int"
    group_size: int | None = None
    sym: bool = False
    double_quant: bool = False
    scale_dtype: str = "float16"
    clip_search: bool = False
    outliers: float = 0.0

    def __post_init__(self) -> None:
        fmt = formats.get(self.format)
        if self.bits is None:
            object.__setattr__(self, "bits", fmt.default_bits)
        if len(fmt.bits) == 1:
            _check(self.bits == fmt.bits[0], f"format={self.format!r} is a {fmt.bits[0]}-bit codebook; got "
                   f"bits={self.bits}, use bits={fmt.bits[0]}")  # fmt: skip
        _check(self.bits in fmt.bits, f"bits={self.bits} is not supported; use one of {tuple(sorted(fmt.bits))}")
        if not fmt.zero_points:
            object.__setattr__(self, "sym", True)
        if fmt.block is not None:
            self._check_block(fmt.block)
        if self.group_size is None:
            object.__setattr__(self, "group_size", 128)
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

    def _check_block(self, bt) -> None:
        _check(self.group_size in (None, bt.group), f"format={self.format!r} is llama.cpp's {bt.qtype.name}: its "
               f"groups are {bt.group} columns; leave group_size out (got {self.group_size})")  # fmt: skip
        _check(not self.double_quant, f"format={self.format!r}: llama.cpp's blocks store their own scales; "
               "double_quant does not apply")  # fmt: skip
        _check(self.outliers == 0, f"format={self.format!r}: llama.cpp's blocks cannot hold exact outliers; "
               "use outliers=0")  # fmt: skip
        object.__setattr__(self, "group_size", bt.group)
        object.__setattr__(self, "scale_dtype", "float16")  # what the blocks store

    @property
    def block(self):
        """The llama.cpp block type (formats/ggml.py) of a block format, else None."""
        return self.number_format.block

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def number_format(self) -> formats.NumberFormat:
        return formats.get(self.format)

    @property
    def has_zeros(self) -> bool:
        """Whether an integer zero point is stored per group (asymmetric grids)."""
        return self.number_format.zero_points and not self.sym

    def describe(self) -> str:
        """A short human name, e.g. 'int4-asym-g128', 'nf4-g64-dq'."""
        fmt = self.number_format
        if fmt.block is not None:
            return self.format + ("-clip" if self.clip_search else "")
        g = {PER_CHANNEL: "pc", PER_TENSOR: "pt"}.get(self.group_size, f"g{self.group_size}")
        name = self.format if len(fmt.bits) == 1 else f"{self.format}{self.bits}"
        if fmt.zero_points:
            name += "-sym" if self.sym else "-asym"
        extra = "".join(
            s for s, on in (("-dq", self.double_quant), ("-clip", self.clip_search)) if on
        ) + (f"-out{self.outliers:g}" if self.outliers else "")
        return f"{name}-{g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown quantization scheme fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


GPTQ_INPUTS = ("quantized", "fp")
REFINE_FROM = ("gptq", "rtn")
# The default GPTQ recipe, from benchmarks/results/gptq_recipe.md (SmolLM2, int2/3/4-g128 and NF4-g64, two
# calibration draws, six recipes): clip search on (without it int2 is unusable, int3 / int4 / NF4 lose 38% / 9% / 3%);
# H from the quantized model's inputs, group by group (true sequential): 0.45% above the best recipe per scheme on
# average, the lowest of all; damping 0.01 (0.1, measured with fp inputs, helped at 3-4 bits and hurt at 2 and NF4).
GPTQ_CLIP_SEARCH = True
GPTQ_INPUTS_WHY = ("the lowest perplexity over int2/int3/int4-g128 and NF4-g64 on SmolLM2, "
                   "benchmarks/results/gptq_recipe.md")
# Learned rounding (--refine): steps of a bare --refine, and what was measured (benchmarks/results/refine.md).
REFINE_STEPS = 50
REFINE_DEFAULT_MAX_BITS = 3  # `llmq quantize --method gptq` refines by default at this width and below


def refine_by_default(scheme: "QuantScheme", mixed, gguf_recipe) -> bool:
    """Whether `llmq quantize --method gptq` refines (REFINE_STEPS) when --refine is not given: one integer grid of at
    most REFINE_DEFAULT_MAX_BITS bits, where it was measured to pay most (benchmarks/results/refine.md). Codebooks
    (NF3 0.70 and NF4 0.82 of GPTQ's increase, one draw each: not made the default without a second), llama.cpp's
    block formats (little gain: their scales stay as the block search chose), 4 bits and mixed precision are refined
    only when asked."""
    return mixed is None and gguf_recipe is None and scheme.format == "int" and scheme.bits <= REFINE_DEFAULT_MAX_BITS

REFINE_WHY = ("Measured on SmolLM2 (benchmarks/results/refine.md, fp 19.92): perplexity int2 g64 111.6 -> 61.6 "
              "(0.45 of GPTQ's increase over fp), int3 g128 33.04 -> 28.02 (0.62), int4 g128 22.84 -> 21.76 (0.63), "
              "NF3 g64 28.81 -> 26.14 (0.70), NF4 g64 21.39 -> 21.13 (0.82), in 2.2x GPTQ's time.")


EXPERT_POLICIES = ("layer", "rtn", "all")


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
                   "quantized" is the default: measured better than "fp" on SmolLM2 at 2, 3 and 4 bits, much better
                   at 2 (benchmarks/results/gptq_recipe.md; gptq_inputs.md's opposite finding came from a bug that
                   fed up_proj's H one calibration window, fixed since).
    sequential:    with inputs="quantized", quantize a layer's linears group by group (q/k/v, o, gate/up, down),
                   each from the inputs the already-quantized groups produce ("true sequential"); False takes
                   every H of the layer from one pass of the unquantized layer, as the original GPTQ code does.
    expert_policy: mixture of experts (pipeline/experts.py): an expert routed fewer than `expert_min_tokens` tokens
                   gets its H from every token of the layer ("layer"), or is rounded to nearest ("rtn"); "all" gives
                   every expert the H of every token (llm-compressor's moe_calibrate_all_experts).
    expert_min_tokens: None: the expert's input width (below it its H is rank deficient).
    experts_per_pass: experts whose Hessians are alive at once; 0: as many as 8 GiB of fp32 Hessians hold.
    refine:        after GPTQ, train each layer's rounding (an offset per weight) and a scale factor per group on the
                   layer's output for this many steps (pipeline/refine.py); 0: off.
    refine_seqlen: tokens of each calibration window (its prefix) the refinement trains on.
    refine_lr:     signed-gradient step, falling linearly to 0 (measured on SmolLM2 int3 g128 with the "fp" target:
                   0.005 -> 28.06, 0.01 -> 27.90 perplexity; benchmarks/results/refine.md).
    refine_clip:   learn the group scale factors too (llama.cpp's block formats learn the rounding only).
    refine_from:   "gptq": start from GPTQ's codes; "rtn": from round to nearest (AutoRound's start).
    refine_target: what the layer's output is trained towards: "fp" (the default): the fp model's own output of that
                   layer, so each layer also corrects the error the quantized layers before it left in its inputs;
                   "quantized": the fp layer's output on the inputs the quantized model gives it (AutoRound's).
                   "fp" measured better on SmolLM2 int3 g128 (28.06 against 29.11 perplexity, 28.25 against 28.65
                   with a window-wide loss; benchmarks/results/refine.md).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    max_damp_tries: int = 4
    inputs: str = "quantized"
    sequential: bool = True
    replay: bool = True
    expert_policy: str = "layer"
    expert_min_tokens: int | None = None
    experts_per_pass: int = 0
    refine: int = 0
    refine_seqlen: int = 512
    refine_lr: float = 0.01
    refine_clip: bool = True
    refine_from: str = "gptq"
    refine_target: str = "fp"

    def __post_init__(self) -> None:
        _check(0.0 < self.damp <= 1.0, f"damp={self.damp} must be in (0, 1]; 0.01 is the paper's value")
        _check(self.block_size >= 1, f"block_size={self.block_size} must be >= 1")
        _check(self.max_damp_tries >= 0, f"max_damp_tries={self.max_damp_tries} must be >= 0")
        _check(self.inputs in GPTQ_INPUTS, f"inputs={self.inputs!r} is not known; use one of {', '.join(GPTQ_INPUTS)}")
        _check(self.expert_policy in EXPERT_POLICIES, f"expert_policy={self.expert_policy!r} is not known; use one of "
               f"{', '.join(EXPERT_POLICIES)}")  # fmt: skip
        _check(self.expert_min_tokens is None or self.expert_min_tokens >= 0,
               f"expert_min_tokens={self.expert_min_tokens} must be >= 0")  # fmt: skip
        _check(self.experts_per_pass >= 0, f"experts_per_pass={self.experts_per_pass} must be >= 1 (0: automatic)")
        _check(isinstance(self.refine, int) and self.refine >= 0,
               f"refine={self.refine!r} must be a number of steps >= 0 (0: off; 100 is a usual value)")  # fmt: skip
        _check(self.refine_seqlen >= 1, f"refine_seqlen={self.refine_seqlen} must be >= 1")
        _check(self.refine_lr > 0, f"refine_lr={self.refine_lr} must be > 0")
        _check(self.refine_target in GPTQ_INPUTS, f"refine_target={self.refine_target!r} is not known; use one of "
               f"{', '.join(GPTQ_INPUTS)}")  # fmt: skip
        _check(self.refine_from in REFINE_FROM, f"refine_from={self.refine_from!r} is not known; use one of "
               f"{', '.join(REFINE_FROM)}")  # fmt: skip


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


GRANULARITIES = ("linear", "row")


@dataclass(frozen=True)
class MixedConfig:
    """Mixed precision: a scheme per linear ("linear") or per output row ("row"), chosen by measured sensitivity so
    that the average bits per weight (every stored byte counted) is at most `target_bpw`.

    candidates: scheme names to choose from (`scheme_from_name`); None = DEFAULT_CANDIDATES, or
    DEFAULT_ROW_CANDIDATES per row.
    """

    target_bpw: float
    candidates: tuple[str, ...] | None = None
    granularity: str = "linear"

    def __post_init__(self) -> None:
        _check(1.0 < self.target_bpw <= 16.0, f"target_bpw={self.target_bpw:g}: give an average bits per weight "
               "between 1 and 16, e.g. 3.5")  # fmt: skip
        _check(self.granularity in GRANULARITIES,
               f"granularity={self.granularity!r} is not known; use one of {', '.join(GRANULARITIES)}")
        if self.candidates is None:
            rows = self.granularity == "row"
            object.__setattr__(self, "candidates", DEFAULT_ROW_CANDIDATES if rows else DEFAULT_CANDIDATES)
        _check(len(self.candidates) > 0, "give at least one candidate scheme, e.g. int3-g128,int4-g128")
        for n in self.candidates:
            scheme_from_name(n)

    def schemes(self, **base: Any) -> dict[str, QuantScheme]:
        """The candidates by name, with `base` (e.g. clip_search, scale_dtype, sym) for the fields a name leaves out."""
        return {n: scheme_from_name(n, **base) for n in self.candidates}


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


def _format_of_name(head: str) -> dict[str, Any] | None:
    """'int4' -> format int, 4 bits; a codebook's name ('nf4') -> that codebook (its one width); else None."""
    for name, fmt in formats.FORMATS.items():
        if len(fmt.bits) == 1 and head == name:
            return {"format": name, "bits": fmt.bits[0]}
        if len(fmt.bits) > 1 and head.startswith(name) and head[len(name):] in {str(b) for b in fmt.bits}:
            return {"format": name, "bits": int(head[len(name):])}
    return None


def scheme_from_name(name: str, **defaults: Any) -> QuantScheme:
    """Parse a scheme name as `QuantScheme.describe()` writes it, e.g. 'int4-g128', 'int3-asym-g64-dq',
    'nf4-g64', 'nf3-g64-dq', 'int8-pc', 'int4-sym-g128-clip-out0.005'. `defaults` fill the fields
    the name leaves out."""
    parts = name.strip().lower().split("-")
    head = _format_of_name(parts[0])
    block = head is not None and formats.get(head["format"]).block is not None
    _check(head is not None and (len(parts) >= 2 or block), f"scheme name {name!r} not understood; write e.g. int4-g128, "
           f"int3-g64-dq, nf4-g64, int8-pc, int4-g128-out0.005, q4_k (formats: {', '.join(formats.FORMATS)})")  # fmt: skip
    kw: dict[str, Any] = dict(defaults) | head
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


# Candidates for mixed precision (--target-bpw): 2/3/4/8 bits x group sizes, double-quantized scales, NF3/NF4 and
# outliers, each filling a different point of the size ladder; a scheme that another candidate beats at the same or
# lower size on SmolLM2 is left out (benchmarks/results/notes.md lists both).
DEFAULT_CANDIDATES = ("int2-g64", "int2-g32-dq", "int2-g32", "nf3-g256-dq", "nf3-g128-dq", "nf3-g64-dq", "nf3-g32-dq",
                      "int3-g32-dq", "nf4-g128-dq", "nf4-g64-dq", "nf4-g32-dq", "nf4-g32", "int8-g128",
                      "int3-g128-out0.005", "int4-g128-out0.005")  # fmt: skip
# Candidates when schemes are chosen per output row (--granularity row): one per code width, so a linear has at most
# 4 pieces (each piece is one kernel call); outliers are not allowed there (their count is known only after GPTQ).
DEFAULT_ROW_CANDIDATES = ("int2-g32-dq", "nf3-g128-dq", "nf4-g128-dq", "int8-g128")
