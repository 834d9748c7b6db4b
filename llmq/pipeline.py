"""Quantize a whole model, decoder layer by decoder layer.

RTN needs no data: each linear is quantized from its own weight. GPTQ runs the calibration windows
through the model one decoder layer at a time:

  1. capture the inputs of layer 0 (and the arguments the layers need: masks, position embeddings);
  2. for each layer, for each sequential group of linears (archs.py): forward hooks accumulate
     H = 2XXᵀ/n (fp32) of each linear's input while the layer runs on every window — stopping as soon
     as the group has seen its inputs — then each linear is quantized and its weight replaced by the
     dequantized one, so later groups see the quantized layer;
  3. re-run the layer on every window: its outputs are the next layer's inputs.

The active layer may live on a GPU (`device`) while the model stays on the CPU; activations live on
`act_device`. Per layer it logs time and the relative output error ‖Y_q − Y‖/‖Y‖ (on up to
`ERR_SAMPLES` windows).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .algorithms.gptq import gptq
from .algorithms.rtn import rtn
from .archs import ArchSpec, arch_for, decoder_layers, weight_of
from .config import GPTQConfig, QuantPlan, QuantScheme
from .errors import LlmqError
from .qtensor import QuantizedWeight

log = logging.getLogger("llmq")
ERR_SAMPLES = 16


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float | None = None
    modules: dict[str, float] = field(default_factory=dict)  # name -> bits per weight


def rtn_model(model, plan: QuantPlan, quiet: bool = False) -> dict[str, QuantizedWeight]:
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    out: dict[str, QuantizedWeight] = {}
    for i in tqdm(range(len(layers)), desc="quantize (rtn)", unit="layer", disable=quiet):
        for rel in spec.linears:
            name = f"{spec.layers}.{i}.{rel}"
            out[name] = rtn(weight_of(layers[i].get_submodule(rel), spec), plan.scheme_for(name))
    return out


# ---- GPTQ ---------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""


class _Catcher(torch.nn.Module):
    """Stands in for layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __getattr__(self, name):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        self.args, self.kwargs = args, kwargs
        raise _Stop


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer0_inputs(model, spec: ArchSpec, calib: torch.Tensor, act_device) -> tuple[list, tuple, dict]:
    """Inputs of decoder layer 0 for each calibration window, and the layer arguments (same for all)."""
    layers = decoder_layers(model, spec)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for row in calib:
            try:
                model(row.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = catcher.layer
    return [x.to(act_device) for x in catcher.inputs], catcher.args, catcher.kwargs


def _run_layer(layer, x, args, kwargs, device):
    out = layer(x.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _HessianHooks:
    """Forward hooks accumulating H = 2XᵀX/n per linear; stop the pass once every module has fired."""

    def __init__(self, modules: dict[str, torch.nn.Module], device):
        self.H = {n: None for n in modules}
        self.count = {n: 0 for n in modules}
        self.fired: set[str] = set()
        self.stop_early = True
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        self.device = device

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)  # [tokens, in]
            if self.H[name] is None:
                self.H[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.H[name].addmm_(x.t(), x)
            self.count[name] += x.shape[0]
            self.fired.add(name)
            if self.stop_early and len(self.fired) == len(self.H):
                raise _Stop

        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        return {n: H * (2.0 / max(self.count[n], 1)) for n, H in self.H.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gptq_model(model, plan: QuantPlan, calib: torch.Tensor, cfg: GPTQConfig | None = None, device=None,
               act_device="cpu", quiet: bool = False, reports: list | None = None) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ over every decoder layer. The model's linears end up holding their dequantized weights."""
    if calib is None:
        raise LlmqError("GPTQ needs calibration data: pass --calib PATH|NAME (token windows)")
    cfg = cfg or GPTQConfig()
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    device = torch.device(device) if device else next(model.parameters()).device
    inps, args, kwargs = capture_layer0_inputs(model, spec, calib, act_device)
    args, kwargs = _move(args, device), _move(kwargs, device)
    out: dict[str, QuantizedWeight] = {}
    bar = tqdm(range(len(layers)), desc="quantize (gptq)", unit="layer", disable=quiet)
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        ref_out = None
        for gi, group in enumerate(spec.sequential):
            mods = {rel: layer.get_submodule(rel) for rel in group}
            hooks = _HessianHooks(mods, device)
            hooks.stop_early = gi > 0  # the first pass runs whole: its outputs are the fp reference
            try:
                outs = []
                for k, x in enumerate(inps):
                    try:
                        y = _run_layer(layer, x, args, kwargs, device)
                        if gi == 0 and k < ERR_SAMPLES:
                            outs.append(y.to(act_device))
                    except _Stop:
                        pass
                if gi == 0:
                    ref_out = outs
            finally:
                hooks.remove()
            for rel, H in hooks.hessians().items():
                name = f"{spec.layers}.{i}.{rel}"
                mod = mods[rel]
                qw = gptq(weight_of(mod, spec), H, plan.scheme_for(name), cfg, name)
                Wq = qw.dequantize(mod.weight.dtype).to(mod.weight.device)
                mod.weight.copy_(Wq.t() if spec.transposed else Wq)
                out[name] = qw
            del hooks
        num = den = 0.0
        for k, x in enumerate(inps):
            y = _run_layer(layer, x, args, kwargs, device).to(act_device)
            if k < len(ref_out):
                num += (y - ref_out[k]).float().square().sum().item()
                den += ref_out[k].float().square().sum().item()
            inps[k] = y
        layer.to(home)
        rep = LayerReport(i, time.perf_counter() - t0, (num / den) ** 0.5 if den else None,
                          {n: q.bits_per_weight() for n, q in out.items() if n.startswith(f"{spec.layers}.{i}.")})  # fmt: skip
        if reports is not None:
            reports.append(rep)
        msg = f"layer {i}: {rep.seconds:.1f}s, relative output error {rep.rel_error:.4f}"
        if quiet:
            log.debug(msg)
        else:
            bar.write(msg)
    return out


def quantize(model, scheme: QuantScheme | QuantPlan, calib: torch.Tensor | None = None, method: str = "rtn",
             gptq: GPTQConfig | None = None, quiet: bool = True, **kw) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Quantize `model`'s decoder linears; returns {module name: QuantizedWeight}.

    method="rtn": calibration-free, the model is unchanged. method="gptq": `calib` is [N, L] token ids;
    the model's linears are left holding their dequantized (fake-quantized) weights."""
    plan = scheme if isinstance(scheme, QuantPlan) else QuantPlan(scheme)
    if method == "rtn":
        return rtn_model(model, plan, quiet)
    if method == "gptq":
        return gptq_model(model, plan, calib, gptq, quiet=quiet, **kw)
    raise LlmqError(f"method={method!r} is not supported; use 'rtn' or 'gptq'")
