"""Quantize a whole model, decoder layer by decoder layer.

RTN needs no data: each linear is quantized from its own weight. GPTQ runs the calibration windows
through the model one decoder layer at a time:

  1. capture the inputs of layer 0 (and the arguments the layers need: masks, position embeddings);
  2. for each layer, for each sequential group of linears (archs.py): forward hooks accumulate
     H = 2XXᵀ/n (fp32) of each linear's input while the layer runs on every window — stopping as soon
     as the group has seen its inputs — then each linear is quantized and its weight replaced by the
     dequantized one, so later groups see the quantized layer;
  3. re-run the layer on every window: its outputs are the next layer's inputs.

With GPTQConfig(inputs="fp") the activations stay those of the full-precision model instead: one pass of
the fp layer accumulates every linear's H and yields the next layer's inputs; then the layer is quantized.

The active layer may live on a GPU (`device`) while the model stays on the CPU; activations live on
`act_device`. Per layer it logs time and the relative output error ‖Y_q − Y‖/‖Y‖ (on up to
`ERR_SAMPLES` windows).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .algorithms.gptq import gptq
from .algorithms.rtn import rtn
from .archs import ArchSpec, arch_for, decoder_layers, quantizable_names, weight_of
from .config import GPTQConfig, QuantPlan, QuantScheme
from .errors import LlmqError
from .lazy import trim_heap
from .qtensor import QuantizedWeight, RowSplitWeight
from .recipes import resolve_shapes

log = logging.getLogger("llmq")
ERR_SAMPLES = 16


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float | None = None
    modules: dict[str, float] = field(default_factory=dict)  # name -> bits per weight


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, plan: QuantPlan, name: str,
                    cfg: GPTQConfig | None = None) -> QuantizedWeight | RowSplitWeight:  # fmt: skip
    """One linear by the plan: GPTQ with H, or RTN when H is None; a linear the plan splits by output row is
    quantized piece by piece (each piece's rows with its own scheme, the same H)."""
    def one(Wp, scheme):
        return rtn(Wp, scheme) if H is None else gptq(Wp, H, scheme, cfg or GPTQConfig(), name)

    split = plan.row_splits.get(name)
    return one(W, plan.scheme_for(name)) if split is None else RowSplitWeight.quantize(W, split, one)


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

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.H = {n: None for n in modules}
        self.count = {n: 0 for n in modules}
        self.fired: set[str] = set()
        self.stop_early = True
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

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
        """The accumulated H, scaled in place (no copies: at C = 5632 each is 127 MB)."""
        return {n: H.mul_(2.0 / max(self.count[n], 1)) for n, H in self.H.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclass
class Activations:
    """Inputs of the current decoder layer for every calibration window, and the layer's extra arguments."""

    inps: list[torch.Tensor]
    args: tuple
    kwargs: dict
    device: torch.device
    act_device: torch.device | str = "cpu"


def start_activations(model, spec: ArchSpec, calib: torch.Tensor, device=None, act_device="cpu") -> Activations:
    if calib is None:
        raise LlmqError("GPTQ needs calibration data: pass --calib PATH|NAME (token windows)")
    device = torch.device(device) if device else torch.device("cpu")
    inps, args, kwargs = capture_layer0_inputs(model, spec, calib, act_device)
    return Activations(inps, _move(args, device), _move(kwargs, device), device, act_device)


def check_finite(W: torch.Tensor, name: str) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise LlmqError(f"{name}.weight has {bad} NaN/Inf value(s); the source checkpoint is damaged there. Repair "
                        "or re-download the model (llmq will not quantize non-finite weights)")  # fmt: skip


def rtn_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan) -> dict[str, QuantizedWeight]:
    out = {}
    for rel in spec.linears:
        name = f"{spec.layers}.{i}.{rel}"
        W = weight_of(layer.get_submodule(rel), spec)
        check_finite(W, name)
        out[name] = quantize_linear(W, None, plan, name)
    return out


def install_dequantized(layer, i: int, spec: ArchSpec, qweights: dict[str, QuantizedWeight]) -> None:
    """Give the layer's linears their dequantized weights (what the next layer will see)."""
    with torch.no_grad():
        for rel in spec.linears:
            mod = layer.get_submodule(rel)
            Wq = qweights[f"{spec.layers}.{i}.{rel}"].dequantize(mod.weight.dtype).to(mod.weight.device)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)


@torch.no_grad()
def advance(layer, acts: Activations, ref_out: list | None = None) -> float | None:
    """Run the layer on every window; its outputs replace `acts.inps`. Returns ‖Y − ref‖/‖ref‖ over the
    windows that have a reference output."""
    home = next(layer.parameters()).device
    layer.to(acts.device)
    num = den = 0.0
    for k, x in enumerate(acts.inps):
        y = _run_layer(layer, x, acts.args, acts.kwargs, acts.device).to(acts.act_device)
        if ref_out and k < len(ref_out):
            num += (y - ref_out[k]).float().square().sum().item()
            den += ref_out[k].float().square().sum().item()
        acts.inps[k] = y
    layer.to(home)
    return (num / den) ** 0.5 if den else None


@torch.no_grad()
def gptq_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig, acts: Activations) -> tuple[dict, LayerReport]:
    """Quantize one decoder layer with GPTQ, group by group; then advance the activations through it.
    cfg.inputs == "fp": see gptq_layer_fp."""
    if cfg.inputs == "fp":
        return gptq_layer_fp(layer, i, spec, plan, cfg, acts)
    t0 = time.perf_counter()
    home = next(layer.parameters()).device
    layer.to(acts.device)
    out: dict[str, QuantizedWeight] = {}
    ref_out = None
    for gi, group in enumerate(spec.sequential):
        mods = {rel: layer.get_submodule(rel) for rel in group}
        for rel, mod in mods.items():
            check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
        hooks = _HessianHooks(mods)
        hooks.stop_early = gi > 0  # the first pass runs whole: its outputs are the fp reference
        try:
            outs = []
            for k, x in enumerate(acts.inps):
                try:
                    y = _run_layer(layer, x, acts.args, acts.kwargs, acts.device)
                    if gi == 0 and k < ERR_SAMPLES:
                        outs.append(y.to(acts.act_device))
                except _Stop:
                    pass
            if gi == 0:
                ref_out = outs
        finally:
            hooks.remove()
        Hs = hooks.hessians()
        del hooks  # Hs is now the only reference: each H is freed as soon as its module is done
        trim_heap()  # the stopped passes' activations, held in traceback cycles
        out |= _quantize_modules(i, spec, plan, cfg, mods, Hs)
        trim_heap()
    layer.to(home)
    err = advance(layer, acts, ref_out)
    rep = LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()})
    return out, rep


def _quantize_modules(i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig, mods: dict,
                      Hs: dict) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ each module from its H (popped, so each is freed when done); install the dequantized weight."""
    out = {}
    for rel in list(Hs):
        name = f"{spec.layers}.{i}.{rel}"
        mod = mods[rel]
        qw = quantize_linear(weight_of(mod, spec), Hs.pop(rel), plan, name, cfg)
        Wq = qw.dequantize(mod.weight.dtype).to(mod.weight.device)
        mod.weight.copy_(Wq.t() if spec.transposed else Wq)
        out[name] = qw
    return out


@torch.no_grad()
def gptq_layer_fp(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig,
                  acts: Activations) -> tuple[dict, LayerReport]:
    """GPTQ with every linear's H from full-precision inputs: one pass of the fp layer over every window
    accumulates all H and gives the next layer's (fp) inputs; then every linear is quantized. `acts`
    holds the fp model's activations, so on resume a finished layer is advanced with its fp weights.
    Unlike the sequential path, all of the layer's H are alive at once (7 for a Llama layer)."""
    t0 = time.perf_counter()
    home = next(layer.parameters()).device
    layer.to(acts.device)
    mods = {rel: layer.get_submodule(rel) for rel in spec.linears}
    for rel, mod in mods.items():
        check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
    hooks = _HessianHooks(mods)
    hooks.stop_early = False
    # the first ERR_SAMPLES windows' inputs, for the error report (their fp outputs replace them in acts)
    sample = replace(acts, inps=acts.inps[:ERR_SAMPLES])
    try:
        for k, x in enumerate(acts.inps):
            acts.inps[k] = _run_layer(layer, x, acts.args, acts.kwargs, acts.device).to(acts.act_device)
    finally:
        hooks.remove()
    Hs = hooks.hessians()
    del hooks
    out = _quantize_modules(i, spec, plan, cfg, mods, Hs)
    trim_heap()
    err = advance(layer, sample, ref_out=acts.inps[:ERR_SAMPLES])  # sample.inps become the quantized outputs
    layer.to(home)
    return out, LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()})


def log_layer(rep: LayerReport, bar, quiet: bool) -> None:
    err = f", relative output error {rep.rel_error:.4f}" if rep.rel_error is not None else ""
    msg = f"layer {rep.index}: {rep.seconds:.1f}s{err}"
    log.debug(msg) if quiet else bar.write(msg)


@torch.no_grad()
def gptq_model(model, plan: QuantPlan, calib: torch.Tensor, cfg: GPTQConfig | None = None, device=None,
               act_device="cpu", quiet: bool = False, reports: list | None = None) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ over every decoder layer of an in-memory model. Its linears end up holding their dequantized
    weights. (`llmq quantize` streams layers from disk instead: convert.py.)"""
    cfg = cfg or GPTQConfig()
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    acts = start_activations(model, spec, calib, device or next(model.parameters()).device, act_device)
    out: dict[str, QuantizedWeight] = {}
    bar = tqdm(range(len(layers)), desc="quantize (gptq)", unit="layer", disable=quiet)
    for i in bar:
        q, rep = gptq_layer(layers[i], i, spec, plan, cfg, acts)
        out |= q
        if reports is not None:
            reports.append(rep)
        log_layer(rep, bar, quiet)
    return out


def quantize(model, scheme: QuantScheme | QuantPlan, calib: torch.Tensor | None = None, method: str = "rtn",
             gptq: GPTQConfig | None = None, quiet: bool = True, **kw) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Quantize `model`'s decoder linears; returns {module name: QuantizedWeight}.

    method="rtn": calibration-free, the model is unchanged. method="gptq": `calib` is [N, L] token ids;
    the model's linears are left holding their dequantized (fake-quantized) weights."""
    plan = scheme if isinstance(scheme, QuantPlan) else QuantPlan(scheme)
    plan = resolve_shapes(plan, linear_shapes(model))[0]  # llama.cpp's fallback for block formats
    if method == "rtn":
        return rtn_model(model, plan, quiet)
    if method == "gptq":
        return gptq_model(model, plan, calib, gptq, quiet=quiet, **kw)
    raise LlmqError(f"method={method!r} is not supported; use 'rtn' or 'gptq'")
