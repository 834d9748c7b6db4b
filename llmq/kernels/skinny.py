"""Split-K dequant-GEMM for small M (decode: M <= 16): y = x @ dequantize(W)ᵀ, fp32 accumulation.

    x      fp16 | bf16 | fp32 [M, K], row-major contiguous, M <= 16
    W      a TritonWeight (kernels/layout.py)
    y      x.dtype [M, N]

At small M the weight bytes are the whole cost, so the grid spreads the weight over every SM: program
(n, s) owns BLOCK_N columns and every SPLIT_K-th BLOCK_K slice of K, dequantizes its W tiles in registers,
multiplies by the (tiny, L2-resident) x tile, and adds its partial [M, BLOCK_N] sums into an fp32 buffer
with atomics; the wrapper casts the buffer to x.dtype. M is padded to 16 rows inside the kernel (masked
loads), the smallest tl.dot shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_inputs
from .dequant import dot_block
from .gemm import kernel_args
from .layout import TritonWeight, ieee_dot

MAX_M = 16


def autotune_configs() -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): narrow N tiles and deep K splits give enough programs for 132 SMs at
    N = 4096; wide tiles for the 28672-wide layers."""
    out = []
    for bn, bk, sk, warps in [(64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 2, 4), (128, 64, 8, 4), (256, 64, 4, 8),
                              (32, 128, 8, 2), (64, 128, 1, 4), (128, 128, 2, 4)]:  # fmt: skip
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps, num_stages=3,
                                 pre_hook=_zero_output))  # fmt: skip
    return out


def _zero_output(nargs):
    nargs["acc_ptr"].zero_()


@triton.jit
def _skinny_kernel(x_ptr, qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, acc_ptr, M, N, K, NB, zero_sym,
                   BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   LUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):  # fmt: skip
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        acc = dot_block(acc, x_ptr, qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, offs_m, offs_n, k0, M, K, N, NB,
                        zero_sym, BITS, GROUP, BLOCK_K, DQ, HAS_ZEROS, LUT, IEEE)  # fmt: skip
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


_tuned = triton.autotune(configs=autotune_configs(), key=["M", "N", "K", "BITS", "GROUP", "DQ", "LUT"])(_skinny_kernel)


def skinny(x: torch.Tensor, tw: TritonWeight, config: dict | None = None) -> torch.Tensor:
    """x [M <= 16, K] -> y [M, N] (x.dtype). `config` fixes BLOCK_N/BLOCK_K/SPLIT_K (tests); default: autotuned."""
    check_inputs(x, tw)
    M, K = x.shape
    if M > MAX_M:
        raise ValueError(f"skinny: M = {M} > {MAX_M}; use kernels.gemm for larger batches")
    acc = torch.zeros(M, tw.N, dtype=torch.float32, device=x.device)
    (qw, s, step, off, z, cb, nb, zs), consts = kernel_args(tw)
    ieee = ieee_dot(x)
    if config:
        grid = (triton.cdiv(tw.N, config["BLOCK_N"]), config["SPLIT_K"])
        _skinny_kernel[grid](x, qw, s, step, off, z, cb, acc, M, tw.N, K, nb, zs, IEEE=ieee, **consts, **config)
    else:
        grid = lambda meta: (triton.cdiv(tw.N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _tuned[grid](x, qw, s, step, off, z, cb, acc, M, tw.N, K, nb, zs, IEEE=ieee, **consts)
    return acc if x.dtype == torch.float32 else acc.to(x.dtype)
