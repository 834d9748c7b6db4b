"""QuantLinear: a linear layer whose weight is a QuantizedWeight, with backend dispatch (RowSplitLinear: one
QuantLinear per piece of a linear quantized per output row with several schemes).

The packed parts are registered as buffers under their stored names (`qweight`, `scales`, ...), so the
module's state dict is exactly the checkpoint's tensors. Backends:
  reference  dequantize the whole weight, then matmul; serves every scheme on every device.
  cpu        PyTorch's native int4 / int8 packed kernels (see backends.py), repacked once in `prepare()`.
  triton     fused dequant-GEMM kernels on CUDA (llmq.kernels).
"auto" picks triton on CUDA, cpu on CPU where it serves the layer, else reference, and logs its choice once
per (backend, reason). A backend asked for by name that cannot serve a layer raises, naming the layer.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .config import QuantScheme, RowSplit
from .errors import LlmqError
from .qtensor import QuantizedWeight, RowSplitWeight

log = logging.getLogger("llmq")
BACKENDS = ("auto", "reference", "cpu", "triton")
_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


class QuantLinear(torch.nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise LlmqError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
        self.out_features, self.in_features = qweight.shape
        self.scheme: QuantScheme = qweight.scheme
        self.part_names = tuple(qweight.parts)
        for k, v in qweight.parts.items():
            self.register_buffer(k, v)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.requested = os.environ.get("LLMQ_BACKEND", "auto") if backend == "auto" else backend
        if self.requested not in BACKENDS:
            raise LlmqError(f"LLMQ_BACKEND={self.requested!r} is not a backend; choose one of {BACKENDS}")
        self.backend = None  # chosen in prepare(), once the buffers hold data
        self.name = ""
        self._packed: dict = {}
        if not any(v.is_meta for v in qweight.parts.values()):
            self.prepare()

    @classmethod
    def skeleton(cls, shape: tuple[int, int], scheme: QuantScheme, bias: bool, nnz: int = 0, permuted: bool = False,
                 backend: str = "auto") -> "QuantLinear":  # fmt: skip
        """An empty QuantLinear on the meta device whose buffers have the stored dtypes and shapes, for a
        loader to fill (transformers' from_pretrained)."""
        from .qtensor import OPTIONAL_PARTS, expected_layout

        parts = {}
        for k, (dtype, shp) in expected_layout(shape, scheme).items():
            parts[k] = torch.empty(shp if shp is not None else (nnz,), dtype=dtype, device="meta")
        if permuted:
            parts["perm"] = torch.empty(shape[1], dtype=OPTIONAL_PARTS["perm"], device="meta")
        b = torch.empty(shape[0], device="meta") if bias else None
        return cls(QuantizedWeight(tuple(shape), scheme, parts), b, backend)

    def prepare(self, name: str | None = None) -> None:
        """Called once the buffers hold real data (and again after a move to another device): pick the
        backend, and repack for it."""
        from . import backends

        self.name = name or self.name
        where = self.name or f"QuantLinear({self.in_features}->{self.out_features})"
        dev = self.qweight.device
        shape = (self.out_features, self.in_features)
        want = self.requested
        if dev.type == "meta":  # offloaded by accelerate: tensors arrive per forward, nothing to repack once
            if want not in ("auto", "reference"):
                raise LlmqError(f"{where}: backend {want!r} cannot serve a layer offloaded by device_map")
            _log_once("llmq: layers offloaded by device_map use the reference backend")
            self.backend, self._packed = "reference", {}
            return
        self.backend = self._choose(want, dev, shape, where)
        if self.backend != "reference":
            _log_once(f"llmq: using the {self.backend} backend")
        qw = self.quantized_weight()
        self._packed = {}
        if self.backend == "cpu":
            self._packed = backends.repack_int8(qw) if self.scheme.bits == 8 else backends.repack_int4(qw)
        elif self.backend == "triton":
            from .kernels import repack_for_triton

            self._packed = repack_for_triton(qw)
        if self.backend != "reference":
            self._packed["outliers"] = backends.outlier_correction(qw)
        for k in [k for k in self._buffers if k.startswith("repacked_")]:
            del self._buffers[k]
        for k, v in self._packed.items():  # counted by get_memory_footprint(), kept out of the state dict
            if isinstance(v, torch.Tensor) and v.layout == torch.strided:
                self.register_buffer(f"repacked_{k}", v, persistent=False)

    def _choose(self, want: str, dev: torch.device, shape: tuple[int, int], where: str) -> str:
        """The backend for this layer: the requested one (or raise), or auto's pick (or reference, logged)."""
        from . import backends
        from .kernels import triton_why_not

        name = want if want != "auto" else {"cuda": "triton", "cpu": "cpu"}.get(dev.type, "reference")
        if name == "reference":
            return name
        if name == "cpu":
            why = backends.cpu_supports(self.scheme, shape) if dev.type == "cpu" else f"tensors on {dev}"
        else:
            why = triton_why_not(self.scheme, shape, dev)
        if why is None:
            return name
        if want == name:
            raise LlmqError(f"{where}: backend {name!r} cannot serve {why}")
        _log_once(f"llmq: {name} backend cannot serve {why}; those layers use the reference backend")
        return "reference"

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight((self.out_features, self.in_features), self.scheme,
                               {k: getattr(self, k) for k in self.part_names})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend is None:
            self.prepare()
        if self.backend == "reference":
            W = self.quantized_weight().dequantize(x.dtype)  # [out, in]
            return F.linear(x, W, bias)
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if "perm" in self.part_names:
            x2 = x2[:, self.perm.long()]
        if self.backend == "cpu":
            from .backends import cpu_matmul

            y = cpu_matmul(x2, self._packed)
        else:
            from .kernels import triton_matmul

            y = triton_matmul(x2, self._packed)
        S = self._packed.get("outliers")
        if S is not None:
            y = y + torch.sparse.mm(S, x2.t().float()).t().to(y.dtype)
        if bias is not None:
            y = y + bias
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
    def skeleton(cls, shape: tuple[int, int], schemes: list[QuantScheme], rows: list[int], bias: bool,
                 nnz: list[int], permuted: list[bool], backend: str = "auto") -> "RowSplitLinear":  # fmt: skip
        """An empty RowSplitLinear on the meta device (see QuantLinear.skeleton); rows[k]: rows of piece k."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = shape
        self.schemes = tuple(schemes)
        self.pieces = torch.nn.ModuleList(QuantLinear.skeleton((r, shape[1]), s, False, n, p, backend)
                                          for s, r, n, p in zip(schemes, rows, nnz, permuted))  # fmt: skip
        self.register_buffer("row_part", torch.empty(shape[0], dtype=torch.uint8, device="meta"))
        self.bias = torch.nn.Parameter(torch.empty(shape[0], device="meta"), requires_grad=False) if bias else None
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


def set_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Switch every QuantLinear of `model` to `backend` ("auto", "reference", "cpu", "triton"); raises,
    naming the layer, if the backend cannot serve one. (The default at load time is $LLMQ_BACKEND or auto.)"""
    if backend not in BACKENDS:
        raise LlmqError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.requested = backend
            m.prepare(name)
    return model
