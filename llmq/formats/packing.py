"""The one bit layout of llmq codes: a little-endian, LSB-first bitstream per row.

Codes of `bits` bits (2, 3, 4, 8) along a row are packed in runs of 8 values into `bits` bytes: value i
of a run occupies bits [bits·i, bits·(i+1)) of the run's little-endian integer. So at 4 bits a byte
holds two codes, the even column in the low nibble; at 2 bits four codes, column 0 in bits 0-1; at 3 bits
8 codes fill 3 bytes. A row of C codes is padded with zeros to a multiple of 8 and takes
ceil(C/8)·bits bytes; at 8 bits a byte is a code and a row takes C bytes (no padding). See docs/FORMAT.md.
"""
from __future__ import annotations

import torch

_CHUNK = 1 << 22  # elements per chunk, bounds the int64 scratch to 32 MiB


def packed_row_bytes(n: int, bits: int) -> int:
    return n if bits == 8 else -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [R, C] uint8 (each < 2**bits) -> [R, ceil(C/8)*bits] uint8."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 8:
        return codes.contiguous()
    R, C = codes.shape
    pad = (-C) % 8
    x = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    runs = x.reshape(-1, 8)  # [R*C8/8, 8]
    out = torch.empty(runs.shape[0], bits, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    step = max(1, _CHUNK // 8)
    for s in range(0, runs.shape[0], step):
        word = (runs[s : s + step].to(torch.int64) << shifts).sum(dim=1, keepdim=True)  # [n, 1]
        out[s : s + step] = ((word >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(R, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: [R, ceil(n/8)*bits] uint8 -> [R, n] uint8."""
    R = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed rows have {packed.shape[1]} bytes; {n} codes of {bits} bits need {packed_row_bytes(n, bits)}"
        )
    if bits == 8:
        return packed
    runs = packed.reshape(-1, bits)  # [R*C8/8, bits]
    out = torch.empty(runs.shape[0], 8, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    mask = (1 << bits) - 1
    step = max(1, _CHUNK // 8)
    for s in range(0, runs.shape[0], step):
        word = (runs[s : s + step].to(torch.int64) << byte_shifts).sum(dim=1, keepdim=True)
        out[s : s + step] = ((word >> shifts) & mask).to(torch.uint8)
    return out.reshape(R, -1)[:, :n]
