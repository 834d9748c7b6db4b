"""QuantizedWeight: one quantized linear weight, exactly as it is stored.

Fields (R = out_features, C = in_features, [Rs, G] = `grouping.param_shape`, P = packed row bytes):

    qweight      uint8 [R, ceil(C/8)*bits]   codes, packed (formats/packing.py), in stored column order
    scales       fp16|bf16|fp32 [Rs, G]       plain per-group scales            (absent with double_quant)
    scales_q     uint8 [Rs, G]                double-quantized scale codes      (double_quant only)
    scales_step  fp32  [G, ceil(Rs/256)]      double-quant step per block       (double_quant only)
    scales_off   fp32  [G, ceil(Rs/256)]      double-quant offset per block     (double_quant only)
    qzeros       uint8 [Rs, ceil(G/8)*bits]   integer zero points, packed       (asymmetric int only)
    outlier_crow int32 [R+1]                  CSR row pointers of exact weights (outliers only)
    outlier_col  int16|int32 [nnz]            stored column of each (int16 when C <= 32767)
    outlier_val  fp16  [nnz]                  its value
    perm         int32 [C]                    act-order: stored column j is input column perm[j]

A llama.cpp block format (q4_0 ... q6_k) stores only `qweight`: uint8 [R, C/block*block_bytes], llama.cpp's
blocks as they are (formats/ggml.py).

Dequantization: W_stored = decode(codes, scales, zeros) with the scheme's number format (llmq/formats); outliers
overwrite their entries; then W[:, perm] = W_stored. `nbytes()` is the sum of the stored tensors' bytes, so
`bits_per_weight()` counts every byte written for the layer. The names these parts are stored under in a
checkpoint are llmq/codec.py's business.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import verify
from .config import QuantScheme, RowSplit
from .errors import LlmqError
from .formats import grid, grouping, packing, scales


def expected_layout(shape: tuple[int, int], scheme: QuantScheme, nnz: int | None = None,
                    permuted: bool = False) -> dict[str, tuple[torch.dtype, tuple | None]]:  # fmt: skip
    """The stored tensors of a weight of `shape` under `scheme`: suffix -> (dtype, shape; None = any).

    nnz: the number of outliers, when known (else their tensors' length is left open); permuted: a `perm` is
    stored (act-order without static groups).
    """
    R, C = shape
    if scheme.block is not None:  # llama.cpp's blocks, as they are (formats/ggml.py)
        check_block_shape(shape, scheme)
        return {"qweight": (torch.uint8, (R, scheme.block.row_bytes(C)))}
    Rs, G = grouping.param_shape(shape, scheme.group_size)
    out: dict[str, tuple[torch.dtype, tuple | None]] = {
        "qweight": (torch.uint8, (R, packing.packed_row_bytes(C, scheme.bits)))
    }
    out |= scales.layout(scheme, Rs, G)
    if scheme.has_zeros:
        out["qzeros"] = (torch.uint8, (Rs, packing.packed_row_bytes(G, scheme.bits)))
    if scheme.outliers > 0:
        col_dtype = torch.int16 if C <= 32767 else torch.int32
        n = None if nnz is None else (nnz,)
        out |= {"outlier_crow": (torch.int32, (R + 1,)), "outlier_col": (col_dtype, n),
                "outlier_val": (torch.float16, n)}  # fmt: skip
    if permuted:
        out["perm"] = (torch.int32, (C,))
    return out


def check_block_shape(shape: tuple[int, int], scheme: QuantScheme, name: str = "") -> None:
    """A llama.cpp block format needs in_features to be a multiple of its block."""
    bt = scheme.block
    if bt is not None and shape[1] % bt.block:
        raise LlmqError(f"{name + ': ' if name else ''}{scheme.format} needs in_features divisible by {bt.block}; "
                        f"the weight is {tuple(shape)} (llama.cpp falls back to another type there: "
                        "formats.ggml.fallback)")  # fmt: skip


def layout_nbytes(layout: dict[str, tuple[torch.dtype, tuple]]) -> int:
    """Bytes of the tensors of a layout whose every shape is known."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())


def check_parts(name: str, layout: dict[str, tuple[torch.dtype, tuple | None]],
                found: dict[str, tuple[torch.dtype, tuple]], what: str = "") -> None:  # fmt: skip
    """Check stored parts (suffix -> (dtype, shape)) against `layout`; raise an LlmqError naming `name`'s tensor.
    `what` ends the messages (e.g. "for weight (64, 64)")."""
    missing = [k for k in layout if k not in found]
    if missing:
        raise LlmqError(f"{name}: missing tensor(s) {', '.join(name + '.' + k for k in missing)}")
    extra = set(found) - set(layout)
    if extra:
        raise LlmqError(f"{name}: unexpected tensor(s) {sorted(extra)} {what}".rstrip())
    for k, (dtype, shape) in found.items():
        want_dtype, want_shape = layout[k]
        if dtype != want_dtype:
            raise LlmqError(f"{name}.{k}: dtype {dtype}, expected {want_dtype}")
        if want_shape is not None and tuple(shape) != tuple(want_shape):
            raise LlmqError(f"{name}.{k}: shape {tuple(shape)}, expected {tuple(want_shape)} {what}".rstrip())


@dataclass
class QuantizedWeight:
    shape: tuple[int, int]
    scheme: QuantScheme
    parts: dict[str, torch.Tensor] = field(repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        codes: torch.Tensor,
        stored_scales: dict[str, torch.Tensor],
        zero: torch.Tensor | None,
        scheme: QuantScheme,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
        perm: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """codes [R, C] uint8 (stored order); zero [Rs, G] integer-valued; outliers = (mask [R, C]
        bool, values [R, C]) in stored order; perm [C] (stored column j = input column perm[j])."""
        R, C = codes.shape
        if scheme.block is not None:  # stored_scales: the block's own parameters (ggml.BlockType.store)
            check_block_shape((R, C), scheme)
            qw = cls((R, C), scheme, {"qweight": scheme.block.pack(codes, stored_scales).contiguous().cpu()})
            qw.validate("<new>")
            return qw
        parts = {"qweight": packing.pack(codes.to(torch.uint8), scheme.bits), **stored_scales}
        if zero is not None:
            parts["qzeros"] = packing.pack(zero.to(torch.uint8), scheme.bits)
        if scheme.outliers > 0:
            mask, values = outliers if outliers is not None else (torch.zeros(R, C, dtype=torch.bool), None)
            parts |= _csr(mask, values)
        if perm is not None:
            parts["perm"] = perm.to(torch.int32).contiguous()
        qw = cls((R, C), scheme, {k: v.contiguous().cpu() for k, v in parts.items()})
        qw.validate("<new>")
        return qw

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, scheme: QuantScheme, name: str) -> QuantizedWeight:
        qw = cls(tuple(shape), scheme, dict(tensors))
        qw.validate(name)
        return qw

    def validate(self, name: str) -> None:
        """Check every stored part's presence, dtype and shape; raise LlmqError naming `name`."""
        layout = expected_layout(self.shape, self.scheme, permuted="perm" in self.parts)
        found = {k: (t.dtype, tuple(t.shape)) for k, t in self.parts.items()}
        check_parts(name, layout, found, f"for {self.scheme.describe()} weight {self.shape}")

    def check_values(self, name: str, values: bool = True) -> None:
        """The parts whose values index something hold valid indices: the outliers' CSR (row pointers from 0 to nnz,
        non-decreasing; columns inside the row) and `perm` (a permutation of the columns). Run once data is loaded;
        a damaged index would otherwise read out of bounds, or silently elsewhere. With `values`, also every value
        no checksum can judge (llmq/verify.py: scales finite and positive, outliers finite, llama.cpp's d finite);
        raises verify.DamagedValue there."""
        if values:
            verify.weight_parts(name, self.scheme, self.parts)
        R, C = self.shape
        if "outlier_crow" in self.parts:
            crow, col = self.parts["outlier_crow"].long(), self.parts["outlier_col"].long()
            nnz = col.numel()
            down = crow[1:] < crow[:-1]
            if crow[0] != 0 or crow[-1] != nnz or bool(down.any()):
                i = 0 if crow[0] != 0 else (R if crow[-1] != nnz else int(down.nonzero()[0, 0]) + 1)
                raise verify.DamagedValue(f"{name}.outlier_crow", f"{int(crow[i])} at position [{i}]",
                                          f"row pointers rising from 0 to {nnz}")  # fmt: skip
            out = (col < 0) | (col >= C)
            if nnz and bool(out.any()):
                i = int(out.nonzero()[0, 0])
                raise verify.DamagedValue(f"{name}.outlier_col", f"{int(col[i])} at position [{i}]", f"a column in 0..{C - 1}")
        if "perm" in self.parts:
            p = self.parts["perm"].long()
            if not torch.equal(torch.sort(p).values, torch.arange(C)):
                ok = (p >= 0) & (p < C)
                seen = torch.zeros(C, dtype=torch.long).index_add_(0, p[ok], torch.ones_like(p[ok]))
                bad = ~ok | (seen[p.clamp(0, C - 1)] > 1)
                i = int(bad.nonzero()[0, 0])
                n = int(seen[int(p[i])]) if ok[i] else 0
                raise verify.DamagedValue(f"{name}.perm", f"{int(p[i])} at position [{i}]" + (f", {n} times" if n else ""),
                                          f"a permutation: each of the {C} columns exactly once")  # fmt: skip

    # ---- reading ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        if self.scheme.block is not None:
            return self.scheme.block.unpack(self.parts["qweight"])[0]
        return packing.unpack(self.parts["qweight"], self.scheme.bits, self.shape[1])

    def scales(self) -> torch.Tensor:
        """Effective fp32 scales [Rs, G]."""
        if self.scheme.block is not None:
            return self.scheme.block.unpack(self.parts["qweight"])[1]
        return scales.effective(self.parts, self.scheme)

    def zeros(self) -> torch.Tensor | None:
        if "qzeros" not in self.parts:
            return None
        G = grouping.param_shape(self.shape, self.scheme.group_size)[1]
        return packing.unpack(self.parts["qzeros"], self.scheme.bits, G).to(torch.float32)

    @property
    def perm(self) -> torch.Tensor | None:
        return self.parts.get("perm")

    def dequantize_stored(self, dtype: torch.dtype = torch.float32, outliers: bool = True) -> torch.Tensor:
        """W in stored column order [R, C] (outliers applied unless outliers=False; permutation not undone)."""
        if self.scheme.block is not None:
            return self.scheme.block.dequantize(self.parts["qweight"]).to(dtype)
        gs = self.scheme.group_size
        s = grouping.expand(self.scales(), self.shape, gs)
        z = self.zeros()
        z = None if z is None else grouping.expand(z, self.shape, gs)
        W = grid(self.scheme).decode(self.codes(), s, z, self.scheme)
        if outliers and "outlier_crow" in self.parts:
            rows, cols, vals = self.outliers()
            W[rows, cols] = vals.to(W.dtype)
        return W.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [R, C] in the layer's own column order."""
        W = self.dequantize_stored(dtype)
        if self.perm is None:
            return W
        out = torch.empty_like(W)
        out[:, self.perm.long()] = W
        return out

    def outliers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the exact weights, stored order."""
        crow = self.parts["outlier_crow"].long()
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), crow[1:] - crow[:-1])
        return rows, self.parts["outlier_col"].long(), self.parts["outlier_val"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])


def _csr(mask: torch.Tensor, values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    R, C = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=R)
    crow = torch.zeros(R + 1, dtype=torch.int32)
    crow[1:] = counts.cumsum(0).to(torch.int32)
    col_dtype = torch.int16 if C <= 32767 else torch.int32
    vals = values[rows, cols] if values is not None else torch.zeros(0)
    return {"outlier_crow": crow, "outlier_col": cols.to(col_dtype), "outlier_val": vals.to(torch.float16)}


@dataclass
class RowSplitWeight:
    """A linear weight quantized per output row with several schemes (config.RowSplit): piece k holds the
    rows r with part[r] == k, in increasing order, as an ordinary QuantizedWeight of shape [R_k, C].

    Stored as `row_part` (uint8 [R]) and each piece's tensors under `pieces.{k}.` (llmq/codec.py, docs/FORMAT.md),
    so `nbytes()` = R + the pieces' bytes."""

    shape: tuple[int, int]
    split: RowSplit
    pieces: list[QuantizedWeight]

    @classmethod
    def quantize(cls, W: torch.Tensor, split: RowSplit, fn) -> RowSplitWeight:
        """W [R, C]; fn(W_rows, scheme) -> QuantizedWeight quantizes one piece (GPTQ and RTN treat rows
        independently, so a piece is quantized exactly as those rows would be in the whole matrix, up to
        the double-quantization blocks, which run over the piece's rows)."""
        if len(split.part) != W.shape[0]:
            raise LlmqError(f"row split for {W.shape[0]} rows has {len(split.part)} entries")
        pieces = [fn(W[torch.tensor(split.rows(k))], s) for k, s in enumerate(split.schemes)]
        return cls((W.shape[0], W.shape[1]), split, pieces)

    def validate(self, name: str) -> None:
        for k, q in enumerate(self.pieces):
            q.validate(f"{name}.pieces.{k}")
            if q.shape != (len(self.split.rows(k)), self.shape[1]):
                raise LlmqError(f"{name}.pieces.{k}: shape {q.shape}, but row_part gives it "
                                f"{len(self.split.rows(k))} rows of {self.shape[1]}")  # fmt: skip

    def check_values(self, name: str, values: bool = True) -> None:
        for k, q in enumerate(self.pieces):
            q.check_values(f"{name}.pieces.{k}", values)

    @property
    def row_part(self) -> torch.Tensor:
        return torch.tensor(self.split.part, dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        W = torch.empty(self.shape, dtype=dtype)
        for k, q in enumerate(self.pieces):
            W[torch.tensor(self.split.rows(k))] = q.dequantize(dtype)
        return W

    def nbytes(self) -> int:
        return self.shape[0] + sum(q.nbytes() for q in self.pieces)

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])

    def describe(self) -> str:
        """e.g. 'rows: int2-g32-dq 120, nf3-g128-dq 400, nf4-g128-dq 56'."""
        return "rows: " + ", ".join(f"{s.describe()} {q.shape[0]}" for s, q in zip(self.split.schemes, self.pieces))
