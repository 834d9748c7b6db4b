"""Learned rounding on a fixed grid (AutoRound's parametrisation, started from GPTQ's codes): the quantized weight
as a differentiable function of a rounding offset per weight and a clip factor per group, and back to a
QuantizedWeight of the same scheme.

For a weight w of a group with scale s (and zero point z, or codebook values v_0 < v_1 < ...), GPTQ stored the
code q0. With x(w) the weight's continuous position on the grid (w/s + z for an integer grid; for a codebook, the
index interpolated between the two nearest values of w/s) and D = q0 − round(x(w)) (an integer: how far GPTQ's
error feedback moved the code from round to nearest), the refined code is

    q = clamp(round(x(w) + V) + D, grid),     ŵ = s·α·value(q),

so V = 0, α = 1 gives back q0 exactly, V ∈ [−0.5, 0.5] moves each code at most one step from GPTQ's choice, and α
(per group, in [ALPHA_MIN, ALPHA_MAX]) rescales the group's grid: a learned scale, which clips the group's range
where it shrinks (OmniQuant's learnable clipping, with the codes left to V). Training sees round() through the
straight-through estimator and each code's value through the slope of its grid (piecewise linear for a codebook);
ŵ is smooth in α.
What is stored stays the scheme's grid: codes of the same width, scales re-stored in the same dtype (double
quantization re-run on the new scales), zero points unchanged, outliers exact and untouched, the permutation kept.

llama.cpp's block formats learn the rounding only (α fixed at 1): their scales are themselves codes under a block
scale (K-quants) or fp16 values the block's own search chose, kept as stored."""
from __future__ import annotations

import torch

from ..formats import grid, grouping
from ..formats.codebook import Codebook
from ..qtensor import QuantizedWeight, RowSplitWeight
from .params import store_params

ALPHA_MIN, ALPHA_MAX = 0.5, 1.2  # a group's scale may shrink to half or widen by a fifth
V_MAX = 0.5
FRAC_MAX = 0.4999  # a weight's distance from its nearest grid position, as stored (a tie would round either way)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) exactly (an integer in fp32), with the gradient of x."""
    return torch.round(x.detach()) + (x - x.detach())


class _Grid:
    """One QuantizedWeight (stored column order) with its learnable V [R, C] and α [Rs, G]."""

    def __init__(self, W: torch.Tensor, qw: QuantizedWeight, clip: bool, device=None):
        self.qw, self.scheme = qw, qw.scheme
        s = qw.scheme
        perm = qw.perm
        Ws = W.detach().to(torch.float32)
        self.W = Ws[:, perm.long()] if perm is not None else Ws  # stored order
        self.inv = None if perm is None else torch.argsort(perm.long())  # stored order -> the layer's
        self.shape = tuple(self.W.shape)
        self.block = s.block
        q0 = qw.codes().to(torch.float32)
        self.book = None
        if self.block is not None:
            _, S, O = self.block.unpack(qw.parts["qweight"])
            self.s0, self.O, self.z = S, O, float(self.block.zero)
            self.lo, self.hi = 0.0, float(self.block.maxq)
        else:
            self.s0, self.O = qw.scales(), None
            zeros = qw.zeros()
            fmt = grid(s)
            self.book = None if fmt.codebook is None else Codebook(fmt.codebook)
            if self.book is None:
                self.z = float(1 << (s.bits - 1)) if zeros is None else zeros.to(torch.float32)  # per group
                self.lo, self.hi = 0.0, float(s.maxq)
            else:  # positions are indices into the sorted distinct values
                self.z = 0.0
                self.lo, self.hi = 0.0, float(len(self.book._sorted) - 1)
                q0 = torch.bucketize(self.book.values[q0.long()], self.book._sorted).to(torch.float32)
        self.exact = None
        if "outlier_crow" in qw.parts:
            rows, cols, vals = qw.outliers()
            self.exact = torch.zeros(self.shape, dtype=torch.bool)
            self.exact[rows, cols] = True
            self.exact_val = torch.zeros(self.shape)
            self.exact_val[rows, cols] = vals.float()
        self.vals = None if self.book is None else self.book._sorted
        for k, v in list(vars(self).items()):  # every fixed tensor where the layer runs
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device or "cpu"))
        self.clip = clip and self.block is None
        R, C = self.shape
        L = grouping.group_len(C, self.scheme.group_size)
        # groups that tile the columns: per-group tensors broadcast over a [R, G, L] view, not expanded per weight
        self.tiled = L if self.scheme.group_size != grouping.PER_TENSOR and C % L == 0 else None
        with torch.no_grad():
            # fixed: the codes move by V only, α scales the grid. Stored as q0 + (x − round(x)) = x + D in one fp32
            # per weight, the fraction kept inside ±FRAC_MAX so that V = 0 rounds to q0 even at a tie
            x = self._position(self.s0_full())
            self.pos = (x - torch.round(x)).clamp_(-FRAC_MAX, FRAC_MAX).add_(q0.to(x.device))
            del x
        dev = self.W.device
        self.W = None  # only its positions are needed from here on
        self.V = torch.zeros(self.shape, device=dev, requires_grad=True)
        self.alpha = torch.ones(self.s0.shape, device=dev, requires_grad=True) if self.clip else None

    def params(self) -> list[torch.Tensor]:
        return [self.V] + ([self.alpha] if self.alpha is not None else [])

    def s0_full(self, alpha: torch.Tensor | None = None) -> torch.Tensor:
        s = self.s0 if alpha is None else self.s0 * alpha
        return grouping.expand(s, self.shape, self.scheme.group_size)

    def z_full(self) -> torch.Tensor | float:
        """The zero point of every weight (asymmetric grids keep theirs per group: one [R, C] copy less)."""
        if isinstance(self.z, float):
            return self.z
        return grouping.expand(self.z, self.shape, self.scheme.group_size)

    def _position(self, s: torch.Tensor) -> torch.Tensor:
        """The continuous grid position of every weight for expanded scales s."""
        if self.block is not None:
            x = self.W if self.O is None else self.W - grouping.expand(self.O, self.shape, self.scheme.group_size)
            return x / s + self.z
        if self.book is None:
            return self.W / s + self.z_full()
        t = (self.W / s).clamp(-1, 1)  # absmax scaling: inside [-1, 1] except a widened α's outliers
        vals = self.vals
        i = (torch.bucketize(t.detach(), vals) - 1).clamp(0, len(vals) - 2)
        return i + (t - vals[i]) / (vals[i + 1] - vals[i])

    def _value(self, pos: torch.Tensor) -> torch.Tensor:
        """The grid value (before the scale) at integer positions `pos`, with the grid's slope as gradient."""
        if self.book is None:
            return pos - self.z_full()
        vals = self.vals
        i = pos.detach().floor().clamp(0, len(vals) - 2).long()
        return vals[i] + (pos - i) * (vals[i + 1] - vals[i])

    def _codes(self, V: torch.Tensor) -> torch.Tensor:
        return torch.clamp(_round_ste(self.pos + V), self.lo, self.hi)

    def weight_autograd(self) -> torch.Tensor:
        """weight() through autograd's own ops, op by op (the reference _FakeQuant's gradients are tested against)."""
        V = self.V.clamp(-V_MAX, V_MAX)
        alpha = None if self.alpha is None else self.alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        return self._place(self.s0_full(alpha) * self._value(self._codes(V)))

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight in the layer's column order, differentiable in V and α."""
        return self._place(_FakeQuant.apply(self.V, self.alpha, self))

    def _place(self, Wq: torch.Tensor) -> torch.Tensor:
        """Offsets, exact outliers and the layer's column order on the grid's values."""
        if self.O is not None:
            Wq = Wq + grouping.expand(self.O, self.shape, self.scheme.group_size)
        if self.exact is not None:
            Wq = torch.where(self.exact, self.exact_val, Wq)
        return Wq if self.inv is None else Wq[:, self.inv]

    @torch.no_grad()
    def finish(self) -> QuantizedWeight:
        """The learned codes (and re-stored scales) as a QuantizedWeight of the same scheme."""
        V = self.V.clamp(-V_MAX, V_MAX)
        qw, s = self.qw, self.scheme
        zeros, stored = qw.zeros(), {k: v for k, v in qw.parts.items() if k.startswith("scales")}
        if self.alpha is not None:
            stored = store_params((self.s0 * self.alpha.clamp(ALPHA_MIN, ALPHA_MAX)).cpu(), zeros, s)[2]
        pos = self._codes(V).cpu().to(torch.uint8)
        if self.block is not None:
            return QuantizedWeight(qw.shape, s, {"qweight": self.block.repack(qw.parts["qweight"], pos)})
        codes = pos if self.book is None or self.book._identity else self.book._code[pos.long()]
        out = None if self.exact is None else (self.exact.cpu(), self.exact_val.cpu())
        return QuantizedWeight.build(codes, stored, zeros, s, out, qw.perm)


class _FakeQuant(torch.autograd.Function):
    """_Grid.weight_autograd in one step: the forward without a graph, the backward from the codes (uint8) and the
    mask where round's gradient passes (bool) instead of a dozen fp32 intermediates (two bytes saved per weight);
    per-group scales and zero points broadcast over a [R, G, L] view of the weight instead of being expanded to one
    value per weight. Forward + backward, int3 g128 with act-order, one thread (benchmarks/refine.py state): 1536 x 576
    9.4 -> 6.4 ms, 576 x 1536 8.8 -> 4.1 ms."""

    @staticmethod
    def forward(ctx, V, alpha, grid: _Grid):
        r = V.clamp(-V_MAX, V_MAX).add_(grid.pos).round_()
        c = r.clamp(grid.lo, grid.hi)
        keep = r == c  # where round's straight-through gradient passes the grid's clamp ...
        del r
        lo, hi = torch.aminmax(V.detach())
        if max(-lo.item(), hi.item()) > V_MAX:  # ... and V's (V stays inside unless trained far)
            keep &= V.abs() <= V_MAX
        a = None if alpha is None else alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        ctx.grid = grid
        ctx.save_for_backward(c.to(torch.uint8), keep, a,
                              None if alpha is None else (alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX))  # fmt: skip
        return _FakeQuant._by_group(grid, _FakeQuant._val(grid, c), grid.s0 if a is None else grid.s0 * a)

    @staticmethod
    def _by_group(grid: _Grid, x: torch.Tensor, p: torch.Tensor, op=torch.Tensor.mul_) -> torch.Tensor:
        """x [R, C] op= per-group p [Rs, G] (in place), over a [R, G, L] view where the groups tile the columns."""
        if grid.tiled is None:
            op(x, grouping.expand(p, grid.shape, grid.scheme.group_size))
        else:
            R, C = grid.shape
            op(x.view(R, C // grid.tiled, grid.tiled), p.unsqueeze(-1))
        return x

    @staticmethod
    def _val(grid: _Grid, c: torch.Tensor) -> torch.Tensor:
        """The grid's values at codes c (a new fp32 tensor)."""
        if grid.book is not None:
            return grid.vals[c.long()]
        if isinstance(grid.z, float):
            return c.float().sub_(grid.z)
        return _FakeQuant._by_group(grid, c.float(), grid.z, torch.Tensor.sub_)

    @staticmethod
    def backward(ctx, g):
        c, keep, a, amask = ctx.saved_tensors
        grid = ctx.grid
        gV = _FakeQuant._by_group(grid, torch.where(keep, g, 0.0), grid.s0 if a is None else grid.s0 * a)
        if grid.book is not None:
            i = c.long().clamp(0, len(grid.vals) - 2)
            gV *= grid.vals[i + 1] - grid.vals[i]
        ga = None
        if a is not None:
            gv = _FakeQuant._val(grid, c).mul_(g)
            ga = grouping.to_groups(gv, grid.scheme.group_size)[0].sum(-1).reshape(grid.s0.shape) * grid.s0 * amask
        return gV, ga, None


class Rounding:
    """The learnable rounding of one linear: a QuantizedWeight, or a RowSplitWeight (a _Grid per piece)."""

    def __init__(self, W: torch.Tensor, qw: QuantizedWeight | RowSplitWeight, clip: bool = True, device=None):
        self.qw = qw
        if isinstance(qw, RowSplitWeight):
            self.rows = [torch.tensor(qw.split.rows(k), device=device) for k in range(len(qw.pieces))]
            self.grids = [_Grid(W[r.cpu()], p, clip, device) for r, p in zip(self.rows, qw.pieces)]
        else:
            self.rows, self.grids = None, [_Grid(W, qw, clip, device)]

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.grids for p in g.params()]

    def weight(self) -> torch.Tensor:
        if self.rows is None:
            return self.grids[0].weight()
        W = torch.zeros(self.qw.shape, device=self.rows[0].device)
        for r, g in zip(self.rows, self.grids):
            W = W.index_copy(0, r, g.weight())
        return W

    def finish(self) -> QuantizedWeight | RowSplitWeight:
        if self.rows is None:
            return self.grids[0].finish()
        return RowSplitWeight(self.qw.shape, self.qw.split, [g.finish() for g in self.grids])
