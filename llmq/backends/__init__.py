"""QuantLinear's backends: a registry with one module per backend, each giving a NAME and three functions:

    why_not(scheme, shape, device) -> str | None   None when it can serve an [out, in] weight of `scheme` on `device`
    repack(qw) -> dict                              its own form of the weight, built once when the layer is prepared
    matmul(x2, packed) -> y                         x2 [M, K] in stored column order -> y [M, N] in x2's dtype

`PREFERENCE` lists, per device type, the backends "auto" tries in order; `reference` (dequantize + matmul) is last
everywhere, since it serves every scheme on every device. QuantLinear itself keeps what is common to all: it gathers
the activations by the act-order permutation before `matmul` and adds the outliers' sparse correction after it, so a
backend sees stored columns and no outliers. Adding a backend is one module here and its name in `PREFERENCE`.
"""
from __future__ import annotations

import logging
import warnings
from types import ModuleType

import torch

from ..errors import LlmqError
from . import cpu, reference, triton

log = logging.getLogger("llmq")
BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (triton, cpu, reference)}
PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}  # other devices: reference
CHOICES = ("auto", *BACKENDS)
_logged: set[str] = set()


def log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def check_name(name: str, what: str = "backend") -> str:
    if name not in CHOICES:
        raise LlmqError(f"{what}={name!r} is not a backend; choose one of {CHOICES}")
    return name


def choose(requested: str, scheme, shape: tuple[int, int], device: torch.device, where: str) -> ModuleType:
    """The backend for one layer: the requested one (or an LlmqError saying why it cannot serve the layer), or for
    "auto" the first of the device's preference list that can (logging, once, why earlier ones could not)."""
    if requested != "auto":
        b = BACKENDS[check_name(requested)]
        why = b.why_not(scheme, shape, device)
        if why is not None:
            raise LlmqError(f"{where}: backend {requested!r} cannot serve {why}")
        return b
    for name in PREFERENCE.get(device.type, ("reference",)):
        why = BACKENDS[name].why_not(scheme, shape, device)
        if why is None:
            return BACKENDS[name]
        log_once(f"llmq: {name} backend cannot serve {why}; those layers use the next backend")
    raise AssertionError("the reference backend serves every layer")  # reference is last in every list


def outlier_correction(qw) -> torch.Tensor | None:
    """Sparse [N, K] fp32 (CSR) of exact minus dequantized values at the outliers, stored column order."""
    if "outlier_crow" not in qw.parts:
        return None
    rows, cols, vals = qw.outliers()
    delta = vals.float() - qw.dequantize_stored(outliers=False)[rows, cols]  # CSR order, as stored
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(qw.parts["outlier_crow"].long(), cols, delta, qw.shape)
