"""Values no checksum can vouch for: a checkpoint whose bytes match its own sha256 can still hold numbers that cannot
be right (written by a buggy tool, a hand edit, a converter from another format). Checked per tensor, from what the
record says it holds, vectorised on the stored dtype (a max and a min per tensor; positions only once one fails):

    scales        plain: finite and > 0 (llmq gives an all-zero group the scale 1, never 0: formats/integer.py,
                  codebook.py); double-quantized: each block's offset (its smallest scale) finite and > 0, its
                  step finite and >= 0, so every scale offset + step·code is positive; and no scale so large that a
                  weight it dequantizes exceeds WEIGHT_LIMIT (WEIGHT_LIMIT / the grid's largest |q - z|)
    block formats llama.cpp's fp16 d / m / dmin of every block finite and within the same bound on the weights they
                  make (d = 0 is a legitimate all-zero block)
    outliers      the exact fp16 values finite, |x| <= WEIGHT_LIMIT (their CSR indices: QuantizedWeight.check_values)
    full precision norms, embeddings, biases, head: finite, |x| <= WEIGHT_LIMIT

What needs no check, by construction of the stored layout: codes and integer zero points are packed `bits` wide, so
every stored bit pattern is a point of the grid (0 .. 2^bits - 1), and every codebook has 2^bits entries
(tests/test_bad_input.py holds both), so no index can fall outside it.

`LLMQ_VERIFY=0` skips these checks together with the hashing; the checks of indices that would read out of bounds
(outliers' CSR, perm, row_part) always run.
"""
from __future__ import annotations

import os

import torch

from .errors import LlmqError
from .formats import doublequant

DAMAGED = "the checkpoint is damaged: re-convert it, or re-download it"
# The largest |value| a weight, norm, bias or embedding may hold, as stored or as dequantized. Real LLMs' largest
# weights are O(10) (even the "super weights"); at 2^12 a single weight times a normalised activation (up to sqrt of
# the hidden size) can overflow float16 arithmetic (65504), which transformers loads float16 checkpoints in. A value
# beyond it is damage: the fuzzer found norms of -64544 and heads of -45984 that checksums vouched for.
WEIGHT_LIMIT = 4096.0


class DamagedValue(LlmqError):
    """A stored value that cannot be right: `tensor` (full name), what was found where, and what was expected."""

    def __init__(self, tensor: str, found: str, expected: str):
        self.tensor, self.found, self.expected = tensor, found, expected
        super().__init__(f"tensor {tensor}: {found}, expected {expected}; {DAMAGED}")

    def located(self, file) -> LlmqError:
        """The same error with the file it is stored in first."""
        return LlmqError(f"{file}: {self}")


def enabled() -> bool:
    return os.environ.get("LLMQ_VERIFY", "1") != "0"


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape)) if bad.dim() else ()


def _refuse(tensor: str, t: torch.Tensor, bad: torch.Tensor, expected: str) -> None:
    pos = _first(bad)
    raise DamagedValue(tensor, f"{t[pos].item()} at position {list(pos)}", expected)


def finite(tensor: str, t: torch.Tensor, limit: float = WEIGHT_LIMIT) -> None:
    """Finite and |x| <= limit (one pass: the min and the max; a NaN fails both comparisons)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (bool(lo >= -limit) and bool(hi <= limit)):
        _refuse(tensor, t, ~(t.abs() <= limit), f"a finite number within ±{limit:g}")


def positive(tensor: str, t: torch.Tensor, strict: bool = True, limit: float = float("inf")) -> None:
    """Finite, > 0 (strict) or >= 0, and <= limit, in one pass (a NaN fails both comparisons)."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (bool(lo > 0) if strict else bool(lo >= 0)) or not bool(hi <= limit) or not bool(torch.isfinite(hi)):
        ok = torch.isfinite(t) & ((t > 0) if strict else (t >= 0)) & (t <= limit)
        bound = f" and <= {limit:.4g}" if limit != float("inf") else ""
        _refuse(tensor, t, ~ok, f"a finite scale {'>' if strict else '>='} 0{bound}")


def _block_multiplier(bt, field: str) -> float:
    """A bound on |weight| / |field| in llama.cpp block type `bt`: d times the largest group scale code (K-quants)
    times the largest |q - z|; dmin times the largest min code; m (Q4_1, Q5_1) itself."""
    sc = (1 << bt.sc_bits) - 1 if bt.k_quant else 1
    if field == "d":
        return sc * max(bt.zero, bt.maxq - bt.zero)
    return sc if field == "dmin" else 1


def _max_code_distance(scheme) -> float:
    """The largest |weight| / scale the scheme's grid holds: max |q - z| for integers (at most 2^bits - 1), the
    largest |value| of a codebook."""
    book = scheme.number_format.codebook
    return float(book.abs().max()) if book is not None else float(scheme.maxq)


def model_tensors(state: dict[str, torch.Tensor]) -> None:
    """Every float tensor of a loaded model's state is finite (tied tensors checked once, offloaded ones skipped)."""
    seen = set()
    for k, t in state.items():
        if t.is_meta or not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        finite(k, t)


def weight_parts(name: str, scheme, parts: dict[str, torch.Tensor]) -> None:
    """The values of a quantized weight's stored parts (those present: a reader may leave out the codes) under
    `scheme`; raises DamagedValue naming `name`.part."""
    if scheme.block is not None:
        if "qweight" in parts:
            bt = scheme.block
            for field, t in bt.half_fields(parts["qweight"]).items():
                try:
                    finite(f"{name}.qweight", t, WEIGHT_LIMIT / _block_multiplier(bt, field))
                except DamagedValue as e:  # name the field and the block, not a byte of the packed row
                    raise DamagedValue(e.tensor, f"{scheme.format} field {field} = {e.found} (row, block)",
                                       e.expected) from None  # fmt: skip
        return
    limit = WEIGHT_LIMIT / _max_code_distance(scheme)
    if "scales" in parts:
        positive(f"{name}.scales", parts["scales"], limit=limit)
    if "scales_off" in parts:
        positive(f"{name}.scales_off", parts["scales_off"])
    if "scales_step" in parts:
        positive(f"{name}.scales_step", parts["scales_step"], strict=False)
    if {"scales_q", "scales_step", "scales_off"} <= parts.keys():
        S = doublequant.dequantize(parts["scales_q"], parts["scales_step"], parts["scales_off"])  # [Rs, G]
        if not bool(S.amax() <= limit):  # a step so large that the scales it makes overflow the weights
            r, g = _first(~(S <= limit))
            raise DamagedValue(f"{name}.scales_step", f"{parts['scales_step'][g, r // doublequant.DQ_BLOCK].item()} "
                               f"at position [{g}, {r // doublequant.DQ_BLOCK}] (it makes scale [{r}, {g}] "
                               f"{S[r, g].item():.4g})", f"scales <= {limit:.4g}")  # fmt: skip
    if "outlier_val" in parts:
        finite(f"{name}.outlier_val", parts["outlier_val"])
