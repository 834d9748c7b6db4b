"""The `cpu` backend: PyTorch's native packed int4 / int8 kernels, repacked once at load.

  - int4, group 32/64/128/256, per channel or per tensor (groups of 128 with repeated scales); in_features is
    zero-padded to a multiple of the group: `torch._weight_int4pack_mm_for_cpu`, which computes
    w = (q - 8)·s + zero' with bf16 activations; ours is w = s·(q - z), so zero' = s·(8 - z).
  - int8, per channel or per tensor: `torch._weight_int8pack_mm` (w = int8 · s per row) on q - 128, plus
    s·(128 - z)·Σx for asymmetric zero points.
Activations are cast to bf16 for both (the int8 op's fp32 path is much slower: benchmarks/results/notes.md).
"""
from __future__ import annotations

import torch

from ..config import PER_CHANNEL, PER_TENSOR, QuantScheme
from ..formats import grouping

NAME = "cpu"
INT4_GROUPS = (32, 64, 128, 256)


def int4_group(scheme: QuantScheme, in_features: int) -> int | None:
    """The tinygemm group size that serves this scheme, or None. K need not be a multiple of it: K is
    zero-padded (padded columns meet zero activations; a short last group keeps its own scale)."""
    if scheme.number_format.codebook is not None or scheme.block is not None or scheme.bits != 4:
        return None
    if scheme.group_size in (PER_CHANNEL, PER_TENSOR):
        return 128  # one scale per row (or tensor), repeated over groups of 128
    return scheme.group_size if scheme.group_size in INT4_GROUPS else None


def padded_k(in_features: int, gs: int) -> int:
    return -(-in_features // gs) * gs


def why_not(scheme: QuantScheme, shape: tuple[int, int], device: torch.device) -> str | None:
    """None if the cpu backend can serve this layer, else why not."""
    if device.type != "cpu":
        return f"tensors on {device}"
    if scheme.block is not None:
        return f"{scheme.format}: llama.cpp's blocks (run the GGUF export in llama.cpp for its speed)"
    N, K = shape
    if scheme.number_format.codebook is None and scheme.bits == 8:
        return None if scheme.group_size in (PER_CHANNEL, PER_TENSOR) else "int8 with groups (native op is per channel)"
    if int4_group(scheme, K) is None:
        return (f"{scheme.describe()}: the native ops serve int4 (groups {INT4_GROUPS}, per channel, per "
                "tensor) and int8 per channel / per tensor")  # fmt: skip
    if N % 16:  # tinygemm's packing tiles
        return f"shape {shape}: int4 packing needs out_features % 16 == 0"
    return None


def int4_operands(qw) -> dict:
    """tinygemm's operands for an int4 weight: codes [N, Kp] int32 (K zero-padded to a multiple of the group with
    code 8), sz [Kp/gs, N, 2] bf16 (scale, zero'), gs, pad. PyTorch's CPU and CUDA int4 kernels take the same ones."""
    N, K = qw.shape
    gs = int4_group(qw.scheme, K)
    Kp = padded_k(K, gs)
    codes = torch.nn.functional.pad(qw.codes().to(torch.int32), (0, Kp - K), value=8)  # [N, Kp]
    s = grouping.expand(qw.scales(), qw.shape, qw.scheme.group_size)  # [N, K] per-column scale
    z = qw.zeros()
    z = torch.full_like(s, 8.0) if z is None else grouping.expand(z, qw.shape, qw.scheme.group_size)
    s_g = s[:, ::gs]  # [N, Kp/gs]: constant within each tinygemm group
    zero_g = (s * (8 - z))[:, ::gs]
    sz = torch.stack([s_g.t(), zero_g.t()], dim=-1).to(torch.bfloat16).contiguous()  # [Kp/gs, N, 2]
    return {"codes": codes, "sz": sz, "gs": gs, "pad": Kp - K}


def repack_int4(qw) -> dict[str, torch.Tensor]:
    p = int4_operands(qw)
    packed = torch._convert_weight_to_int4pack_for_cpu(p["codes"], 1)
    # gs / pad are Python ints, not tensors: reading a tensor's value in forward would break torch.compile graphs
    return {"int4_packed": packed, "int4_sz": p["sz"], "int4_gs": p["gs"], "int4_pad": p["pad"]}


def repack_int8(qw) -> dict[str, torch.Tensor]:
    N, K = qw.shape
    w8 = (qw.codes().to(torch.int16) - 128).to(torch.int8)
    s = qw.scales().reshape(-1).expand(N).contiguous()  # [N] (per tensor: one value repeated)
    z = qw.zeros()
    c = None if z is None else (s * (128 - z.reshape(-1).expand(N)))  # [N]
    # bf16 scales up front: the kernel takes them so, and a cast inside forward would be a computed input, which
    # inductor's lowering of _weight_int8pack_mm rejects under torch.compile
    return {"int8_w": w8, "int8_s": s.to(torch.bfloat16), "int8_c": None if c is None else c.to(torch.bfloat16)}


def repack(qw) -> dict:
    return repack_int8(qw) if qw.scheme.bits == 8 else repack_int4(qw)


def matmul(x2: torch.Tensor, packed: dict) -> torch.Tensor:
    """x2 [M, K] (already permuted) -> [M, N] in x2's dtype."""
    xb = x2.to(torch.bfloat16)  # both native kernels are fast with bf16 activations (int8's fp32 path is not)
    if "int4_packed" in packed:
        pad = packed["int4_pad"]
        if pad:
            xb = torch.nn.functional.pad(xb, (0, pad))
        y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), packed["int4_packed"], packed["int4_gs"],
                                             packed["int4_sz"])  # fmt: skip
        return y.to(x2.dtype)
    y = torch._weight_int8pack_mm(xb.contiguous(), packed["int8_w"], packed["int8_s"])
    if packed["int8_c"] is not None:
        y = y + xb.sum(-1, keepdim=True) * packed["int8_c"]
    return y.to(x2.dtype)
