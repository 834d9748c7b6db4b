"""QuantizedWeight: one quantized linear weight, exactly as it is stored.

Fields (R = out_features, C = in_features, [Rs, G] = `grouping.param_shape`, P = packed row bytes):

    qweight      uint8 [R, ceil(C/8)*bits]   codes, packed (formats/packing.py), in stored column order
    scales       fp16|bf16|fp32 [Rs, G]       plain per-group scales            (absent with double_quant)
    scales_q     uint8 [Rs, G]                double-quantized scale codes      (double_quant only)
    scales_step  fp32  [G, ceil(Rs/256)]      double-quant step per block       (double_quant only)
    scales_off   fp32  [G, ceil(Rs/256)]      double-quant offset per block     (double_quant only)
    qzeros       uint8 [Rs, ceil(G/8)*bits]   integer zero points, packed       (int asym only)
    outlier_crow int32 [R+1]                  CSR row pointers of exact weights (outliers only)
    outlier_col  int16|int32 [nnz]            stored column of each (int16 when C <= 32767)
    outlier_val  fp16  [nnz]                  its value
    perm         int32 [C]                    act-order: stored column j is input column perm[j]

Dequantization: W_stored = decode(codes, scales, zeros); outliers overwrite their entries; then
W[:, perm] = W_stored. `nbytes()` is the sum of the stored tensors' bytes, so `bits_per_weight()`
counts every byte written for the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import QuantScheme, RowSplit
from .errors import LlmqError
from .formats import doublequant, grid, grouping, packing

SCALE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def store_scales(scale: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fp32 scales [Rs, G] -> (the scales dequantization will actually use, fp32; tensors to store).

    Stored scales are never below the requested ones (rounded up to the storage grid), so every weight
    inside the group's range stays within half a step of a grid point."""
    if scheme.double_quant:
        q, step, off = doublequant.quantize(scale)
        stored = {"scales_q": q, "scales_step": step, "scales_off": off}
        eff = doublequant.dequantize(q, step, off)
    else:
        s = scale.to(SCALE_TORCH_DTYPES[scheme.scale_dtype])
        # round up, never down: a smaller stored scale would leave the range's ends off the grid
        s = torch.where(s.to(torch.float32) < scale, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        if not torch.isfinite(s).all():
            raise LlmqError(
                f"a group scale overflows {scheme.scale_dtype} (max {scale.max().item():.3g}); "
                "use scale_dtype='float32' or 'bfloat16'"
            )
        stored, eff = {"scales": s}, s.to(torch.float32)
    eff = torch.where(eff > 0, eff, torch.full_like(eff, torch.finfo(torch.float32).tiny))
    return eff, stored


def expected_layout(shape: tuple[int, int], scheme: QuantScheme) -> dict[str, tuple[torch.dtype, tuple | None]]:
    """The stored tensors of a weight of `shape` under `scheme`: suffix -> (dtype, shape or None=any).

    Optional parts (outliers, perm) are listed separately by `OPTIONAL_PARTS`.
    """
    R, C = shape
    Rs, G = grouping.param_shape(shape, scheme.group_size)
    out: dict[str, tuple[torch.dtype, tuple | None]] = {
        "qweight": (torch.uint8, (R, packing.packed_row_bytes(C, scheme.bits)))
    }
    if scheme.double_quant:
        nb = doublequant.n_blocks(Rs)
        out |= {"scales_q": (torch.uint8, (Rs, G)), "scales_step": (torch.float32, (G, nb)),
                "scales_off": (torch.float32, (G, nb))}  # fmt: skip
    else:
        out["scales"] = (SCALE_TORCH_DTYPES[scheme.scale_dtype], (Rs, G))
    if scheme.format == "int" and not scheme.sym:
        out["qzeros"] = (torch.uint8, (Rs, packing.packed_row_bytes(G, scheme.bits)))
    if scheme.outliers > 0:
        col_dtype = torch.int16 if C <= 32767 else torch.int32
        out |= {"outlier_crow": (torch.int32, (R + 1,)), "outlier_col": (col_dtype, None),
                "outlier_val": (torch.float16, None)}  # fmt: skip
    return out


OPTIONAL_PARTS = {"perm": torch.int32}


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
    ) -> "QuantizedWeight":
        """codes [R, C] uint8 (stored order); zero [Rs, G] integer-valued; outliers = (mask [R, C]
        bool, values [R, C]) in stored order; perm [C] (stored column j = input column perm[j])."""
        R, C = codes.shape
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
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, scheme: QuantScheme, name: str) -> "QuantizedWeight":
        qw = cls(tuple(shape), scheme, dict(tensors))
        qw.validate(name)
        return qw

    def validate(self, name: str) -> None:
        """Check every stored part's presence, dtype and shape; raise LlmqError naming `name`."""
        layout = expected_layout(self.shape, self.scheme)
        missing = [k for k in layout if k not in self.parts]
        if missing:
            raise LlmqError(f"{name}: missing tensor(s) {', '.join(name + '.' + k for k in missing)}")
        extra = set(self.parts) - set(layout) - set(OPTIONAL_PARTS)
        if extra:
            raise LlmqError(f"{name}: unexpected tensor(s) {sorted(extra)} for scheme {self.scheme.describe()}")
        for k, t in self.parts.items():
            dtype, shp = layout.get(k, (OPTIONAL_PARTS.get(k), None))
            if t.dtype != dtype:
                raise LlmqError(f"{name}.{k}: dtype {t.dtype}, expected {dtype}")
            if shp is not None and tuple(t.shape) != shp:
                raise LlmqError(f"{name}.{k}: shape {tuple(t.shape)}, expected {shp} for weight {self.shape}")
        if "perm" in self.parts and tuple(self.parts["perm"].shape) != (self.shape[1],):
            raise LlmqError(f"{name}.perm: shape {tuple(self.parts['perm'].shape)}, expected ({self.shape[1]},)")

    # ---- reading ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return packing.unpack(self.parts["qweight"], self.scheme.bits, self.shape[1])

    def scales(self) -> torch.Tensor:
        """Effective fp32 scales [Rs, G]."""
        p = self.parts
        if self.scheme.double_quant:
            return doublequant.dequantize(p["scales_q"], p["scales_step"], p["scales_off"])
        return p["scales"].to(torch.float32)

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

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.parts.items()}


def _csr(mask: torch.Tensor, values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    R, C = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=R)
    crow = torch.zeros(R + 1, dtype=torch.int32)
    crow[1:] = counts.cumsum(0).to(torch.int32)
    col_dtype = torch.int16 if C <= 32767 else torch.int32
    vals = values[rows, cols] if values is not None else torch.zeros(0)
    return {"outlier_crow": crow, "outlier_col": cols.to(col_dtype), "outlier_val": vals.to(torch.float16)}


def quantize_with_params(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Store the scales, then encode all of W [R, C] with the stored (effective) scales.

    Returns (codes [R, C] uint8, effective scales [Rs, G], stored scale tensors)."""
    eff, stored = store_scales(scale, scheme)
    s = grouping.expand(eff, tuple(W.shape), scheme.group_size)
    z = None if zero is None else grouping.expand(zero, tuple(W.shape), scheme.group_size)
    return grid(scheme).encode(W, s, z, scheme), eff, stored


@dataclass
class RowSplitWeight:
    """A linear weight quantized per output row with several schemes (config.RowSplit): piece k holds the
    rows r with part[r] == k, in increasing order, as an ordinary QuantizedWeight of shape [R_k, C].

    Stored as `row_part` (uint8 [R]) and each piece's tensors under `pieces.{k}.` (docs/FORMAT.md), so
    `nbytes()` = R + the pieces' bytes."""

    shape: tuple[int, int]
    split: RowSplit
    pieces: list[QuantizedWeight]

    @classmethod
    def quantize(cls, W: torch.Tensor, split: RowSplit, fn) -> "RowSplitWeight":
        """W [R, C]; fn(W_rows, scheme) -> QuantizedWeight quantizes one piece (GPTQ and RTN treat rows
        independently, so a piece is quantized exactly as those rows would be in the whole matrix, up to
        the double-quantization blocks, which run over the piece's rows)."""
        if len(split.part) != W.shape[0]:
            raise LlmqError(f"row split for {W.shape[0]} rows has {len(split.part)} entries")
        pieces = [fn(W[torch.tensor(split.rows(k))], s) for k, s in enumerate(split.schemes)]
        return cls((W.shape[0], W.shape[1]), split, pieces)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, schemes: list[QuantScheme],
                     name: str) -> "RowSplitWeight":  # fmt: skip
        """`tensors`: this module's stored tensors without the module prefix (row_part, pieces.K.*)."""
        part = tensors.get("row_part")
        if part is None:
            raise LlmqError(f"{name}: missing tensor {name}.row_part")
        if part.dtype != torch.uint8 or tuple(part.shape) != (shape[0],):
            raise LlmqError(f"{name}.row_part: {part.dtype} {tuple(part.shape)}, expected uint8 ({shape[0]},)")
        split = RowSplit(tuple(schemes), tuple(part.tolist()))
        pieces = []
        for k, s in enumerate(schemes):
            pre = f"pieces.{k}."
            own = {key[len(pre):]: v for key, v in tensors.items() if key.startswith(pre)}
            pieces.append(QuantizedWeight.from_tensors(own, (len(split.rows(k)), shape[1]), s, f"{name}.pieces.{k}"))
        known = {"row_part"} | {f"pieces.{k}.{n}" for k, q in enumerate(pieces) for n in q.parts}
        extra = sorted(set(tensors) - known)
        if extra:
            raise LlmqError(f"{name}: unexpected tensor(s) {extra[:5]} for a split of {len(schemes)} schemes")
        return cls(tuple(shape), split, pieces)

    def validate(self, name: str) -> None:
        for k, q in enumerate(self.pieces):
            q.validate(f"{name}.pieces.{k}")
            if q.shape != (len(self.split.rows(k)), self.shape[1]):
                raise LlmqError(f"{name}.pieces.{k}: shape {q.shape}, but row_part gives it "
                                f"{len(self.split.rows(k))} rows of {self.shape[1]}")  # fmt: skip

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

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.row_part": self.row_part}
        for k, q in enumerate(self.pieces):
            out |= q.tensors(f"{prefix}.pieces.{k}")
        return out

    def describe(self) -> str:
        """e.g. 'rows: int2-g32-dq 120, nf3-g128-dq 400, nf4-g128-dq 56'."""
        return "rows: " + ", ".join(f"{s.describe()} {q.shape[0]}" for s, q in zip(self.split.schemes, self.pieces))
