"""What the integer exporters share: the modules an integer-grid checkpoint can hold, and int32 words of codes.

compressed-tensors and GPTQ both lay codes out as llmq does (formats/packing.py): a little-endian, least-significant-bit-first bitstream, code i
of a row at bits [b·i, b·(i+1)) of the stream. They only read it as int32 words. So a row of n codes of b bits is
llmq's packed bytes, zero-padded to whole words and read as ceil(n·b/32) little-endian int32: the same bits, not
re-derived from any float.
"""
from __future__ import annotations

import sys

import torch

from ..formats import packing
from ..formats.grouping import PER_CHANNEL, PER_TENSOR
from ..record import ModuleRecord


def why_not_integer(m: ModuleRecord, target: str) -> str | None:
    """None when module `m` is one integer grid with per-group (or per-channel) scales whose groups divide its
    in_features and nothing else stored (no outliers, no permutation, no row split); else why not, and the
    `llmq quantize` flags that avoid it."""
    if m.split:
        return "is split by output row (several schemes); quantize without --granularity row"
    w = m.pieces[0]
    s = w.scheme
    if s.block is not None:
        return f"is stored in llama.cpp's {s.format} blocks; export it with --to gguf"
    if s.number_format.codebook is not None:
        return f"uses the {s.format} codebook; {target} stores integer grids: quantize with --format int"
    if w.nnz or s.outliers:
        return "keeps outliers in fp16; quantize without --outliers"
    if w.permuted:
        return "stores an act-order permutation; quantize with --static-groups (the default) or --no-act-order"
    if s.group_size == PER_TENSOR:
        return "has one scale per tensor; quantize with --group-size -1 (per channel) or a group size"
    if s.group_size != PER_CHANNEL and w.shape[1] % s.group_size:
        return (f"has group size {s.group_size}, which does not divide in_features {w.shape[1]} ({target} has no "
                "short last group); quantize with a group size that divides it")  # fmt: skip
    return None


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, n] uint8 (each < 2**bits) -> int32 [rows, ceil(n·bits/32)]."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
        raise RuntimeError("exporting int32 code words needs a little-endian host")
    packed = packing.pack(codes.to(torch.uint8).contiguous(), bits)  # [rows, ceil(n/8)·bits] bytes
    n_words = -(-codes.shape[1] * bits // 32)
    words = torch.zeros(packed.shape[0], -(-packed.shape[1] // 4) * 4, dtype=torch.uint8)  # whole words, row-major
    words[:, : packed.shape[1]] = packed
    return words.view(torch.int32)[:, :n_words].contiguous()
