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

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight((self.out_features, self.in_features), self.scheme,
                               {k: getattr(self, k) for k in self.part_names})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.quantized_weight().dequantize(x.dtype)  # [out, in]
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}, backend={self.backend}"
