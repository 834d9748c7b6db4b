"""Quantize a whole model, decoder layer by decoder layer.

RTN needs no data: each linear is quantized from its own weight. GPTQ runs the calibration windows
through the model one decoder layer at a time:

  1. capture the inputs of layer 0 (and the arguments the layers need: masks, position embeddings);
  2. for each layer, for each sequential group of linears (archs.py): forward pre-hooks accumulate
     H = 2XXᵀ/n (fp32) of each distinct input (q/k/v share one) while the layer runs on every window —
     stopping before the group's linears run — then each linear is quantized and its weight replaced by the
     dequantized one, so later groups see the quantized layer. A finished block (attention once o_proj is
     quantized, the MLP once down_proj is) is replayed from its last linear's recorded input, not recomputed:
     a Llama layer costs about one full forward pass instead of five;
  3. the last pass gives the next layer's inputs.

With GPTQConfig(inputs="fp") the activations stay those of the full-precision model instead: one pass of
the fp layer accumulates every linear's H and yields the next layer's inputs; then the layer is quantized.

The active layer may live on a GPU (`device`) while the model stays on the CPU; activations (and the replayed
blocks' recorded inputs) live on `act_device`. Per layer it reports the time of each phase (timing.py), the
number of passes, and the relative output error ‖Y_q − Y‖/‖Y‖ on the first ERR_TOKENS tokens.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .. import moe, timing
from ..archs import arch_for, decoder_layers, quantizable_names, weight_of
from ..config import GPTQConfig, QuantPlan, QuantScheme
from ..errors import LlmqError
from ..qtensor import QuantizedWeight
from ..recipes import resolve_shapes
from .activations import (ERR_TOKENS, Activations, _pass, _run_layer, advance, capture_layer0_inputs, error_windows,
                          start_activations)  # fmt: skip
from .hessian import _HessianHooks, _Stop, accumulate_xtx, symmetrize
from .layer import gptq_layer, gptq_layer_fp, log_layer, rtn_layer
from .replay import _Replay
from .solve import (LayerReport, check_finite, install_dequantized, quantize_linear, share_layer,
                    solve_owners)  # fmt: skip

__all__ = ["ERR_TOKENS", "Activations", "LayerReport", "_HessianHooks", "_Replay", "_Stop", "_pass", "_run_layer",
           "accumulate_xtx", "advance", "capture_layer0_inputs", "check_finite", "error_windows", "gptq_layer",
           "gptq_layer_fp", "gptq_model", "install_dequantized", "linear_shapes", "log_layer", "quantize",
           "quantize_linear", "rtn_layer", "rtn_model", "share_layer", "solve_owners", "start_activations",
           "symmetrize"]  # fmt: skip

log = logging.getLogger("llmq")


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """[out, in] of every decoder linear llmq quantizes."""
    spec = arch_for(model.config)
    return {n: tuple(weight_of(model.get_submodule(n), spec).shape) for n in quantizable_names(model, spec)}



def rtn_model(model, plan: QuantPlan, quiet: bool = False) -> dict[str, QuantizedWeight]:
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    out: dict[str, QuantizedWeight] = {}
    for i in tqdm(range(len(layers)), desc="quantize (rtn)", unit="layer", disable=quiet):
        out |= rtn_layer(layers[i], i, spec, plan)
    return out



@torch.no_grad()
def gptq_model(model, plan: QuantPlan, calib: torch.Tensor, cfg: GPTQConfig | None = None, device=None,
               act_device="cpu", quiet: bool = False,
               reports: list | None = None) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ over every decoder layer of an in-memory model. Its linears end up holding their dequantized
    weights. (`llmq quantize` streams layers from disk instead: convert.py.)"""
    cfg = cfg or GPTQConfig()
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    acts = start_activations(model, spec, calib, device or next(model.parameters()).device, act_device)
    out: dict[str, QuantizedWeight] = {}
    bar = tqdm(range(len(layers)), desc="quantize (gptq)", unit="layer", disable=quiet)
    for i in bar:
        with timing.Phases(acts.device) as ph:
            q, rep = gptq_layer(layers[i], i, spec, plan, cfg, acts)
        rep = rep.timed(ph)
        out |= q
        if reports is not None:
            reports.append(rep)
        log_layer(rep, bar, quiet)
    return out


def quantize(model, scheme: QuantScheme | QuantPlan, calib: torch.Tensor | None = None, method: str = "rtn",
             gptq: GPTQConfig | None = None, quiet: bool = True, **kw) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Quantize `model`'s decoder linears (a mixture of experts' experts too, each its own linears); returns {module
    name: QuantizedWeight}.

    method="rtn": calibration-free, the model is unchanged. method="gptq": `calib` is [N, L] token ids;
    the model's linears are left holding their dequantized (fake-quantized) weights."""
    plan = scheme if isinstance(scheme, QuantPlan) else QuantPlan(scheme)
    moe.unfuse(model)  # a mixture of experts' fused 3-D experts become linears (same outputs): llmq/moe.py
    plan = resolve_shapes(plan, linear_shapes(model))[0]  # llama.cpp's fallback for block formats
    if method == "rtn":
        return rtn_model(model, plan, quiet)
    if method == "gptq":
        return gptq_model(model, plan, calib, gptq, quiet=quiet, **kw)
    raise LlmqError(f"method={method!r} is not supported; use 'rtn' or 'gptq'")

