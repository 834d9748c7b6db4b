"""The Triton kernels' weight layout, built once at load from a QuantizedWeight, and its torch reference.

The checkpoint stores codes row-major along K (formats/packing.py: a bitstream per output row), which is
right for files but wrong for a GEMM that walks K in blocks for a tile of N outputs: neighbouring threads
must read neighbouring bytes. So `repack` transposes once at load (docs/FORMAT.md, "In memory"):

    qw        int32 [ceil(K/P), N]  P codes per word along K, code k of column n in bits [(k%P)·B, +B) of
                                    word (k//P, n); B = 4, P = 8 for 2/3/4-bit and codebook codes (2- and 3-bit
                                    codes are widened to 4 bits), B = 8, P = 4 for 8-bit codes
    scales    fp16|bf16|fp32 [G, N] per-group scales, transposed              (plain scales)
    scales_q  uint8 [G, N]          double-quantized scale codes, transposed  (double_quant; decoded in
    dq_step   fp32 [G, ceil(N/256)] their step and offset per block of 256     the kernel: off + step·q)
    dq_off    fp32 [G, ceil(N/256)]
    zeros     uint8 [G, N]          integer zero points, unpacked              (int asym only)
    codebook  fp32 [2**bits]        the format's decode table, code -> value  (codebook formats only: the
                                    registry's `codebook`, llmq/formats)

and integers: K, N, G, group length L (group g covers k in [g·L, (g+1)·L); per channel and per tensor
have L = K), B, the symmetric zero point 2**(bits-1), and whether codes are looked up in a codebook. A
per-tensor scale is broadcast to [1, N]. Outliers and the act-order permutation stay with QuantLinear (sparse
correction, gather of x). Dequantized weight: w[k, n] = s[g, n]·(q[k, n] − z[g, n]) (int) or s[g, n]·codebook[q]
(codebook formats).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llmq.config import PER_TENSOR
from llmq.formats import doublequant, grouping, packing
from llmq.qtensor import QuantizedWeight


@dataclass
class TritonWeight:
    """A weight in the kernels' layout (see the module docstring). Tensors all on one device."""

    qw: torch.Tensor
    K: int
    N: int
    group_len: int
    bits: int  # storage width per code: 4 or 8
    zero_sym: int  # z for symmetric int grids (unused when `zeros` or `lut`)
    lut: bool  # codes are looked up in `codebook`
    scales: torch.Tensor | None = None
    scales_q: torch.Tensor | None = None
    dq_step: torch.Tensor | None = None
    dq_off: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    codebook: torch.Tensor | None = None

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def to(self, device) -> "TritonWeight":
        return TritonWeight(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


def pack_words(codes_t: torch.Tensor, bits: int) -> torch.Tensor:
    """codes_t [K, N] uint8 -> int32 [ceil(K/P), N], P = 32 // bits codes per word along K."""
    K, N = codes_t.shape
    per = 32 // bits
    pad = (-K) % per
    c = torch.nn.functional.pad(codes_t, (0, 0, 0, pad)).to(torch.int64).reshape(-1, per, N)
    shifts = (torch.arange(per, device=c.device, dtype=torch.int64) * bits).reshape(1, per, 1)
    words = (c << shifts).sum(1)  # [K/P, N], < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_words(qw: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_words: int32 [ceil(K/P), N] -> uint8 [K, N]."""
    per = 32 // bits
    w = qw.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, device=qw.device, dtype=torch.int64) * bits).reshape(1, per, 1)
    codes = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # [K/P, P, N]
    return codes.reshape(-1, qw.shape[1])[:K].to(torch.uint8)


def repack(qw: QuantizedWeight) -> TritonWeight:
    """QuantizedWeight (checkpoint layout) -> TritonWeight (kernel layout), on the weight's device."""
    s = qw.scheme
    N, K = qw.shape
    p = qw.parts
    dev = p["qweight"].device
    codes = packing.unpack(p["qweight"], s.bits, K)  # [N, K]
    bits = 8 if s.bits == 8 else 4
    G = grouping.n_groups(K, s.group_size)
    book = s.number_format.codebook
    out = TritonWeight(pack_words(codes.t().contiguous(), bits), K, N, grouping.group_len(K, s.group_size), bits,
                       1 << (s.bits - 1), book is not None)  # fmt: skip
    per_tensor = s.group_size == PER_TENSOR
    if s.double_quant and not per_tensor:
        out.scales_q = p["scales_q"].t().contiguous()  # [G, N]
        out.dq_step, out.dq_off = p["scales_step"].contiguous(), p["scales_off"].contiguous()  # [G, nb]
    else:
        sc = qw.scales() if s.double_quant else p["scales"]  # per tensor with double quant: decoded here
        out.scales = sc.t().expand(G, N).contiguous() if per_tensor else sc.t().contiguous()
    if "qzeros" in p:
        Rs, Gz = grouping.param_shape((N, K), s.group_size)
        z = packing.unpack(p["qzeros"], s.bits, Gz).t()  # [G, Rs]
        out.zeros = z.expand(G, N).contiguous() if per_tensor else z.contiguous()
    if out.lut:
        out.codebook = book.to(dev)
    return out


def group_scales(tw: TritonWeight) -> torch.Tensor:
    """fp32 [G, N] scales, decoding double quantization (the kernels do the same per element)."""
    if tw.scales is not None:
        return tw.scales.float()
    return doublequant.dequantize(tw.scales_q.t(), tw.dq_step, tw.dq_off).t()  # [N, G] blocks along N


def dequantize(tw: TritonWeight) -> torch.Tensor:
    """Reference: fp32 Wᵀ [K, N] from the kernel layout."""
    q = unpack_words(tw.qw, tw.bits, tw.K)  # [K, N]
    g = torch.arange(tw.K, device=q.device) // tw.group_len  # [K]
    s = group_scales(tw)[g]  # [K, N]
    if tw.lut:
        return tw.codebook[q.long()] * s
    z = tw.zeros[g].float() if tw.zeros is not None else float(tw.zero_sym)
    return s * (q.float() - z)


def ieee_dot(x: torch.Tensor) -> bool:
    """Whether the kernels multiply in fp32 (IEEE, no TF32): for fp32 activations, and for bf16 under
    Triton's interpreter, whose tl.dot mishandles bf16 operands (numpy has no bf16)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def reference_matmul(x: torch.Tensor, tw: TritonWeight) -> torch.Tensor:
    """The kernels' reference: x [M, K] @ dequantize(tw) in fp32, cast to x.dtype."""
    return (x.float() @ dequantize(tw)).to(x.dtype)
