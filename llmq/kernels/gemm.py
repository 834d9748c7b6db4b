"""Tiled dequant-GEMM for larger M (prefill, batches): y = x @ dequantize(W)ᵀ, fp32 accumulation.

    x      fp16 | bf16 | fp32 [M, K], row-major contiguous (the activations; any M >= 1)
    W      a TritonWeight (kernels/layout.py): codes int32 [ceil(K/P), N] + scales/zeros [G, N]
    y      x.dtype [M, N]

One program computes a [BLOCK_M, BLOCK_N] tile of y, walking K in BLOCK_K steps: load the x tile,
dequantize the W tile in registers (kernels/dequant.py), tl.dot into an fp32 accumulator. Tiles are
grouped along M (GROUP_M) so programs that share W tiles run together and hit L2. fp32 activations use
IEEE fp32 dots (no TF32), so results match the reference to fp32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_inputs
from .dequant import dot_block
from .layout import TritonWeight, ieee_dot


def autotune_configs() -> list[triton.Config]:
    """Tile shapes for M > 16. BLOCK_K of 32..128 keeps a tile inside one group for every group size >= 32
    that is a multiple of it (the common 32/64/128/256)."""
    out = []
    for bm, bn, bk, warps, stages in [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (64, 64, 128, 4, 4), (32, 128, 128, 4, 4), (128, 64, 32, 4, 4)]:  # fmt: skip
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))  # fmt: skip
    return out


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, y_ptr, M, N, K, NB, zero_sym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 LUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = dot_block(acc, x_ptr, qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, offs_m, offs_n, k0, M, K, N, NB,
                        zero_sym, BITS, GROUP, BLOCK_K, DQ, HAS_ZEROS, LUT, IEEE)  # fmt: skip
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))  # fmt: skip


_tuned = triton.autotune(configs=autotune_configs(), key=["M", "N", "K", "BITS", "GROUP", "DQ", "LUT"])(_gemm_kernel)


def kernel_args(tw: TritonWeight) -> tuple[list, dict]:
    """The weight's pointer arguments and its constexprs, shared by both kernels."""
    s = tw.scales_q if tw.scales_q is not None else tw.scales
    dummy = tw.qw  # any tensor: never read when its flag is off
    ptrs = [tw.qw, s, tw.dq_step if tw.dq_step is not None else dummy, tw.dq_off if tw.dq_off is not None else dummy,
            tw.zeros if tw.zeros is not None else dummy, tw.codebook if tw.codebook is not None else dummy]  # fmt: skip
    nb = tw.dq_step.shape[1] if tw.dq_step is not None else 1
    consts = {"BITS": tw.bits, "GROUP": tw.group_len, "DQ": tw.scales_q is not None,
              "HAS_ZEROS": tw.zeros is not None, "LUT": tw.lut}  # fmt: skip
    return ptrs + [nb, tw.zero_sym], consts


def gemm(x: torch.Tensor, tw: TritonWeight, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] (x.dtype). `config` fixes the tile (tests); default: autotuned."""
    check_inputs(x, tw)
    M, K = x.shape
    y = torch.empty(M, tw.N, dtype=x.dtype, device=x.device)
    (qw, s, step, off, z, cb, nb, zs), consts = kernel_args(tw)
    ieee = ieee_dot(x)
    if config:
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(tw.N, config["BLOCK_N"]),)
        _gemm_kernel[grid](x, qw, s, step, off, z, cb, y, M, tw.N, K, nb, zs, IEEE=ieee, GROUP_M=8, **consts, **config)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(tw.N, meta["BLOCK_N"]),)  # noqa: E731
        _tuned[grid](x, qw, s, step, off, z, cb, y, M, tw.N, K, nb, zs, IEEE=ieee, **consts)
    return y
