"""QuantLinear: a linear layer whose weight is a QuantizedWeight, with backend dispatch.

The packed parts are registered as buffers under their stored names (`qweight`, `scales`, ...), so the
module's state dict is exactly the checkpoint's tensors. Backends:
  reference  dequantize the whole weight, then matmul; serves every scheme on every device.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .config import QuantScheme
from .errors import LlmqError
from .qtensor import QuantizedWeight

log = logging.getLogger("llmq")
BACKENDS = ("auto", "reference")


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
        self.backend = "reference" if backend == "auto" else backend

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

    def prepare(self) -> None:
        """Called once the buffers hold real data: pick (and log) the backend."""

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight((self.out_features, self.in_features), self.scheme,
                               {k: getattr(self, k) for k in self.part_names})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.quantized_weight().dequantize(x.dtype)  # [out, in]
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}, backend={self.backend}"
