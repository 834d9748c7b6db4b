"""QuantLinear: a linear layer whose weight is a QuantizedWeight, computed by a backend (RowSplitLinear: one
QuantLinear per piece of a linear quantized per output row with several schemes).

The packed parts are registered as buffers under their stored names (`qweight`, `scales`, ...), so the module's
state dict is exactly the checkpoint's tensors. The backend (llmq/backends: reference, cpu, triton) is chosen when
the buffers hold data (`prepare`): the one asked for, which raises naming the layer if it cannot serve it, or for
"auto" the first of the device's preference list that can. QuantLinear itself gathers the activations by the
act-order permutation and adds the outliers' sparse correction; the backend does the matmul in between.
"""
from __future__ import annotations

import os

import torch

from . import backends
from .config import QuantScheme, RowSplit
from .errors import LlmqError
from .qtensor import QuantizedWeight, RowSplitWeight
from .record import ModuleRecord, WeightRecord


class QuantLinear(torch.nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        backends.check_name(backend)
        self.out_features, self.in_features = qweight.shape
        self.scheme: QuantScheme = qweight.scheme
        self.part_names = tuple(qweight.parts)
        for k, v in qweight.parts.items():
            self.register_buffer(k, v)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.requested = os.environ.get("LLMQ_BACKEND", "auto") if backend == "auto" else backend
        backends.check_name(self.requested, "LLMQ_BACKEND" if backend == "auto" else "backend")
        self.backend: str | None = None  # the chosen backend's name, set in prepare() once the buffers hold data
        self.name = ""
        self._impl = None
        self._packed: dict = {}
        self._offloaded = False
        if not any(v.is_meta for v in qweight.parts.values()):
            self.prepare()

    @classmethod
    def skeleton(cls, rec: WeightRecord, bias: bool, backend: str = "auto") -> "QuantLinear":
        """An empty QuantLinear on the meta device whose buffers have the stored dtypes and shapes of `rec`, for a
        loader to fill (transformers' from_pretrained)."""
        parts = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in rec.layout().items()}
        b = torch.empty(rec.shape[0], device="meta") if bias else None
        return cls(QuantizedWeight(tuple(rec.shape), rec.scheme, parts), b, backend)

    def prepare(self, name: str | None = None) -> None:
        """Called once the buffers hold real data (and again after a move to another device): choose the backend,
        and repack for it."""
        self.name = name or self.name
        where = self.name or f"QuantLinear({self.in_features}->{self.out_features})"
        dev = self.qweight.device
        for k in [k for k in self._buffers if k.startswith("repacked_")]:
            del self._buffers[k]
        self._offloaded = dev.type == "meta"
        if self._offloaded:  # offloaded by accelerate: tensors arrive per forward, nothing to repack once
            if self.requested not in ("auto", "reference"):
                raise LlmqError(f"{where}: backend {self.requested!r} cannot serve a layer offloaded by "
                                         "device_map")  # fmt: skip
            backends.log_once("llmq: layers offloaded by device_map use the reference backend")
            self._impl, self._packed = backends.BACKENDS["reference"], {}
            self.backend = self._impl.NAME
            return
        self._impl = backends.choose(self.requested, self.scheme, (self.out_features, self.in_features), dev, where)
        self.backend = self._impl.NAME
        if self.backend != "reference":
            backends.log_once(f"llmq: using the {self.backend} backend")
        self._packed = self._repack()
        for k, v in self._packed.items():  # counted by get_memory_footprint(), kept out of the state dict
            if isinstance(v, torch.Tensor) and v.layout == torch.strided:
                self.register_buffer(f"repacked_{k}", v, persistent=False)

    def _repack(self) -> dict:
        qw = self.quantized_weight()
        return {**self._impl.repack(qw), "outliers": backends.outlier_correction(qw)}

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight((self.out_features, self.in_features), self.scheme,
                               {k: getattr(self, k) for k in self.part_names})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            self.prepare()
        packed = self._repack() if self._offloaded else self._packed
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if "perm" in self.part_names:
            x2 = x2[:, self.perm.long()]
        y = self._impl.matmul(x2, packed)
        S = packed["outliers"]
        if S is not None:
            y = y + torch.sparse.mm(S, x2.t().float()).t().to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}, backend={self.backend}"

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: repack for the new device on next use
        out = super()._apply(fn, *args, **kwargs)
        self._packed, self.backend = {}, None
        return out


class RowSplitLinear(torch.nn.Module):
    """A linear quantized per output row with several schemes (qtensor.RowSplitWeight): one QuantLinear per
    piece; their outputs are concatenated and put back in row order with one gather."""

    def __init__(self, qweight: RowSplitWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.schemes = qweight.split.schemes
        self.pieces = torch.nn.ModuleList(QuantLinear(q, None, backend) for q in qweight.pieces)
        self.register_buffer("row_part", qweight.row_part)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.name = ""
        self._set_order()

    @classmethod
    def skeleton(cls, rec: ModuleRecord, bias: bool, backend: str = "auto") -> "RowSplitLinear":
        """An empty RowSplitLinear on the meta device (see QuantLinear.skeleton)."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = rec.shape
        self.schemes = rec.schemes
        self.pieces = torch.nn.ModuleList(QuantLinear.skeleton(p, False, backend) for p in rec.pieces)
        self.register_buffer("row_part", torch.empty(rec.shape[0], dtype=torch.uint8, device="meta"))
        self.bias = torch.nn.Parameter(torch.empty(rec.shape[0], device="meta"), requires_grad=False) if bias else None
        self.name, self._order = "", None
        return self

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("row_part",) + tuple(f"pieces.{k}.{n}" for k, p in enumerate(self.pieces) for n in p.part_names)

    def quantized_weight(self) -> RowSplitWeight:
        split = RowSplit(self.schemes, tuple(self.row_part.tolist()))
        return RowSplitWeight((self.out_features, self.in_features), split,
                              [p.quantized_weight() for p in self.pieces])  # fmt: skip

    def prepare(self, name: str | None = None) -> None:
        """Prepare every piece (QuantLinear.prepare) and the row order."""
        self.name = name or self.name
        for k, p in enumerate(self.pieces):
            p.prepare(f"{self.name}.pieces.{k}" if self.name else None)
        self._set_order()

    def _set_order(self) -> None:
        if self.row_part.is_meta:
            self._order = None
            return
        order = torch.argsort(self.row_part.long(), stable=True)  # position in the concatenation -> row
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order), device=order.device)
        self._order = inv  # row -> its position in the concatenated piece outputs

    @property
    def backend(self) -> str | None:
        return "+".join(sorted({p.backend for p in self.pieces if p.backend})) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._order is None:
            self._set_order()
        y = torch.cat([p(x) for p in self.pieces], -1).index_select(-1, self._order)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quantized_weight().describe()}"

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._order = None
        return out


def skeleton(rec: ModuleRecord, bias: bool, backend: str = "auto") -> QuantLinear | RowSplitLinear:
    """The empty module (meta device) that holds quantized module `rec` once a loader fills its buffers."""
    if rec.split:
        return RowSplitLinear.skeleton(rec, bias, backend)
    return QuantLinear.skeleton(rec.pieces[0], bias, backend)


def set_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Switch every QuantLinear of `model` to `backend` ("auto", "reference", "cpu", "triton"); raises,
    naming the layer, if the backend cannot serve one. (The default at load time is $LLMQ_BACKEND or auto.)"""
    backends.check_name(backend)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.requested = backend
            m.prepare(name)
    return model
