"""Number formats: a registry with one entry per format, looked up by the scheme's `format` name.

An entry gives the code widths the format stores (its default first), its codebook (the value of each code for an
absmax-scaled codebook; None for a uniform integer grid), whether it stores integer zero points (asymmetric
grids), and the three functions every algorithm uses:

    find_params(Wg [Rs, G, L], mask, scheme, shrink) -> (scale [Rs, G], zero [Rs, G] or None)
    encode(W, scale, zero, scheme) -> codes uint8          decode(codes, scale, zero, scheme) -> W fp32

and optionally fake_quantize(W, scale, zero, scheme) = decode(encode(W)) bit for bit, without the codes (in place).

llama.cpp's block formats (q4_0 ... q6_k, formats/ggml.py) take the same three functions with an offset in place of
the zero point, fix their own group size, and are stored as llama.cpp's block bytes.

Adding a format is its table or arithmetic in a module here and one `register` call below. QuantScheme's
validation, scheme names (`config.scheme_from_name`), the CLI's --format, RTN, GPTQ, the clip search, double
quantization, checkpoints, both loaders, the reference backend and the Triton kernels' decode table read it from
here; nothing else names a format.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LlmqError
from . import fp, ggml, integer, nf


@dataclass(frozen=True, eq=False)
class NumberFormat:
    name: str
    bits: tuple[int, ...]  # code widths it can store, the default first
    codebook: torch.Tensor | None  # fp32 [2**bits]: value of each code (absmax-scaled); None: uniform integer grid
    zero_points: bool  # asymmetric schemes store an integer zero point per group
    find_params: Callable
    encode: Callable
    decode: Callable
    help: str
    block: ggml.BlockType | None = None  # llama.cpp's block formats: stored as its block bytes (formats/ggml.py)
    fake_quantize: Callable | None = None  # (W, scale, zero, scheme) -> decode(encode(W)), faster (in place)

    @property
    def default_bits(self) -> int:
        return self.bits[0]

    def quantize_dequantize(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                            scheme) -> torch.Tensor:  # fmt: skip
        """decode(encode(W)) as a new fp32 tensor, bit for bit; the clip search runs it for every candidate."""
        if self.fake_quantize is not None:
            return self.fake_quantize(W, scale, zero, scheme)
        return self.decode(self.encode(W, scale, zero, scheme), scale, zero, scheme)


FORMATS: dict[str, NumberFormat] = {}


def register(fmt: NumberFormat) -> NumberFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"number format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> NumberFormat:
    """The format called `name`, or an LlmqError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise LlmqError(f"format={name!r} is not supported; use one of {tuple(FORMATS)}") from None


def grid(scheme) -> NumberFormat:
    """The format of a QuantScheme."""
    return get(scheme.format)


def codebook_formats() -> tuple[str, ...]:
    return tuple(n for n, f in FORMATS.items() if f.codebook is not None)


def block_formats() -> tuple[str, ...]:
    return tuple(n for n, f in FORMATS.items() if f.block is not None)


def _absmax(name: str, book, help: str) -> NumberFormat:
    return NumberFormat(name, (book.bits,), book.values, False, book.find_params, book.encode, book.decode, help)


register(NumberFormat("int", (4, 2, 3, 8), None, True, integer.find_params, integer.encode, integer.decode,
                      "uniform integer grid; --sym without zero points", fake_quantize=integer.fake_quantize))
register(_absmax("nf4", nf.NF4, "NormalFloat codebook of 16 values (QLoRA)"))
register(_absmax("nf3", nf.NF3, "NormalFloat codebook of 8 values"))
register(_absmax("nf2", nf.NF2, "codebook -1, -1/4, 1/4, 1"))
register(_absmax("fp4", fp.FP4, "4-bit float E2M1, +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}/6 (QLoRA, bitsandbytes)"))

for _bt in ggml.TYPES.values():
    register(NumberFormat(_bt.name, (_bt.bits,), None, False, _bt.find_params, _bt.encode, _bt.decode,
                          f"llama.cpp's {_bt.qtype.name} blocks ({_bt.block} columns, {_bt.type_size} bytes; "
                          "exports to GGUF as they are)", _bt))
