"""Quantize a whole model, layer by layer.

RTN needs no data: every quantizable linear is quantized from its own weight. GPTQ (see `gptq_layers`)
runs the calibration windows through the decoder layers one at a time.
"""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from .algorithms.rtn import rtn
from .archs import arch_for, decoder_layers, weight_of
from .config import QuantPlan, QuantScheme
from .qtensor import QuantizedWeight

log = logging.getLogger("llmq")


def rtn_model(model, plan: QuantPlan, quiet: bool = False) -> dict[str, QuantizedWeight]:
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    out: dict[str, QuantizedWeight] = {}
    for i in tqdm(range(len(layers)), desc="quantize (rtn)", unit="layer", disable=quiet):
        t0 = time.perf_counter()
        for rel in spec.linears:
            name = f"{spec.layers}.{i}.{rel}"
            out[name] = rtn(weight_of(layers[i].get_submodule(rel), spec), plan.scheme_for(name))
        log.debug("layer %d: %.2fs", i, time.perf_counter() - t0)
    return out


def quantize(model, scheme: QuantScheme | QuantPlan, calib=None, method: str = "rtn", gptq=None,
             quiet: bool = True) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Quantize `model`'s decoder linears; returns {module name: QuantizedWeight}. The model is unchanged
    for RTN; `calib` (token ids [N, L]) is required for GPTQ."""
    plan = scheme if isinstance(scheme, QuantPlan) else QuantPlan(scheme)
    if method == "rtn":
        return rtn_model(model, plan, quiet)
    if method == "gptq":
        from .gptq_pipeline import gptq_model

        return gptq_model(model, plan, calib, gptq, quiet=quiet)
    from .errors import LlmqError

    raise LlmqError(f"method={method!r} is not supported; use 'rtn' or 'gptq'")
