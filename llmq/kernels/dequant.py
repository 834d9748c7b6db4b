"""What both GEMM kernels share: `dequant_tile`, a [BLOCK_K, BLOCK_N] tile of W in fp32 from the layout of
kernels/layout.py, and `dot_block`, one K step (load x, dequantize W, tl.dot). `@triton.jit` helpers,
inlined into each kernel.

Arguments (pointers into the TritonWeight tensors; offs_k [BLOCK_K] and offs_n [BLOCK_N] int32 absolute
indices, masks for the edges):
  qw_ptr     int32 [ceil(K/P), N]  codes, P = 32 // BITS per word along K
  s_ptr      scales [G, N] (any float dtype) — or, with DQ, scales_q uint8 [G, N]
  step_ptr, off_ptr  fp32 [G, NB] double-quant step / offset (DQ only; NB = ceil(N / 256))
  z_ptr      uint8 [G, N] zero points (HAS_ZEROS only)
  cb_ptr     fp32 [2**BITS] the format's codebook, code -> value (LUT only: codebook formats)
GROUP (constexpr) is the group length L; when it is a multiple of BLOCK_K (and blocks start on multiples of
BLOCK_K) a tile lies in one group and its scales are one row [BLOCK_N], else they are gathered per k.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_tile(qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, offs_k, offs_n, k0, K, N, NB, zero_sym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, DQ: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, LUT: tl.constexpr):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)  # [BK, BN]
    shift = ((offs_k % PER) * BITS)[:, None]
    q = (words >> shift) & ((1 << BITS) - 1)  # int32 codes; >> is arithmetic, the mask clears the sign
    if GROUP % BLOCK_K == 0:  # the whole tile is in group k0 // GROUP: one row of parameters
        g = k0 // GROUP
        pidx = g * N + offs_n[None, :]  # [1, BN]
        pmask = mask_n[None, :]
    else:
        g2 = (offs_k // GROUP)[:, None]
        pidx = g2 * N + offs_n[None, :]  # [BK, BN]
        pmask = mask
    if DQ:
        sq = tl.load(s_ptr + pidx, mask=pmask, other=0).to(tl.float32)
        bidx = (pidx // N) * NB + (offs_n[None, :] // 256)
        s = tl.load(off_ptr + bidx, mask=pmask, other=0) + tl.load(step_ptr + bidx, mask=pmask, other=0) * sq
    else:
        s = tl.load(s_ptr + pidx, mask=pmask, other=0).to(tl.float32)
    if LUT:
        w = tl.load(cb_ptr + q) * s
    else:
        if HAS_ZEROS:
            z = tl.load(z_ptr + pidx, mask=pmask, other=0).to(tl.float32)
        else:
            z = zero_sym.to(tl.float32)
        w = (q.to(tl.float32) - z) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def dot_block(acc, x_ptr, qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, offs_m, offs_n, k0, M, K, N, NB, zero_sym,
              BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, DQ: tl.constexpr,
              HAS_ZEROS: tl.constexpr, LUT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] fp32 += x[offs_m, k0:k0+BLOCK_K] @ W[k0:k0+BLOCK_K, offs_n] (dequantized here).
    IEEE: multiply in fp32 without TF32 (fp32 activations)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0)  # fmt: skip
    w = dequant_tile(qw_ptr, s_ptr, step_ptr, off_ptr, z_ptr, cb_ptr, offs_k, offs_n, k0, K, N, NB, zero_sym,
                     BITS, GROUP, BLOCK_K, DQ, HAS_ZEROS, LUT)  # fmt: skip
    if IEEE:
        acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
    else:
        acc += tl.dot(a, w.to(a.dtype))
    return acc
