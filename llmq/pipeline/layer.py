"""The layer loop's step: one decoder layer by RTN or GPTQ (quantized or full-precision inputs), its groups of
linears in order, an expert set as one more kind of unit (experts.py)."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from .. import timing
from ..archs import ArchSpec, weight_of
from ..config import GPTQConfig, QuantPlan
from ..distributed import World
from ..lazy import trim_heap
from ..qtensor import QuantizedWeight
from . import experts
from .activations import Activations, _pass, _run_layer, advance, error_windows
from .hessian import _HessianHooks
from .refine import RefineData, refine_layer
from .replay import _Replay
from .solve import (
    LayerReport,
    _quantize_modules,
    check_finite,
    install_dequantized,
    quantize_linear,
    share_layer,
    solve_owners,
)

log = logging.getLogger("llmq")


def rtn_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan, world: World | None = None) -> dict[str, QuantizedWeight]:
    """RTN of every linear of the layer; with a world, each rank quantizes its share and all get every result."""
    world = world or World()
    spec = spec.at(i)
    mods = {rel: layer.get_submodule(rel) for rel in spec.linears}
    owners = solve_owners(mods, spec, world, gptq=False)
    out = {}
    for rel, mod in mods.items():
        name = f"{spec.layers}.{i}.{rel}"
        W = weight_of(mod, spec)
        check_finite(W, name)
        if owners[rel] == world.rank:
            out[name] = quantize_linear(W, None, plan, name)
    return share_layer(layer, i, spec, out, owners, world, install=False)  # RTN: nothing runs through the layer



@torch.no_grad()
def gptq_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig,
               acts: Activations) -> tuple[dict, LayerReport]:  # fmt: skip
    """Quantize one decoder layer with GPTQ, group by group; then advance the activations through it.
    cfg.inputs == "fp": see gptq_layer_fp.

    Passes: the first group's pass stops at its linears' input (the first ERR_TOKENS tokens run the fp layer
    whole: the error reference); each later group's pass stops where that group's input is complete, with the
    finished blocks replayed (_Replay); the last pass gives the next layer's inputs. With cfg.sequential=False,
    one pass accumulates every H from the unquantized layer (the original GPTQ code's way)."""
    if cfg.inputs == "fp":
        return gptq_layer_fp(layer, i, spec, plan, cfg, acts)
    t0 = time.perf_counter()
    spec = spec.at(i)
    home = next(layer.parameters()).device
    layer.to(acts.device)
    out: dict[str, QuantizedWeight] = {}
    ref_out: list = []
    replay = _Replay(layer, spec, acts.device)
    groups = spec.sequential
    if not cfg.sequential:  # one group of every dense linear; expert sets after it, as units
        groups = (tuple(n for n in spec.linears if not spec.expert(n)),) + tuple(
            g for g in spec.sequential if spec.expert(g[0]))  # fmt: skip
    done: set[str] = set()
    report: dict[str, dict] = {}
    fp, data = _refine_start(layer, spec, cfg, acts)
    refined: dict = {}
    try:
        for gi, group in enumerate(groups):
            unit = spec.expert(group[0])
            if unit is not None:  # an expert set: its gate/up group and its down group in one unit
                if unit[2] == "down_proj":
                    continue
                full = error_windows(acts) if gi == 0 else 0
                calls = experts.record_inputs(layer, unit[0], acts, replay, full=full, ref=ref_out)
                q, report[unit[0]] = experts.quantize_experts(layer, i, spec, unit[0], plan, cfg, acts, calls)
                del calls
                out |= q
                done |= {n for g in spec.sequential for n in g if (x := spec.expert(n)) and x[0] == unit[0]}
                with timing.phase("params"):
                    trim_heap(collect=False)
                continue
            mods = {rel: layer.get_submodule(rel) for rel in group}
            for rel, mod in mods.items():
                check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
            record = replay.recordable(group, done) if cfg.replay else ()
            hooks = _HessianHooks(mods, record=record, record_device=acts.act_device)
            try:
                _pass(layer, acts, hooks, replay, full=error_windows(acts) if gi == 0 else 0, ref=ref_out)
            finally:
                hooks.remove()
            if gi == 0:  # which blocks replay was seen on rank 0's whole windows (window 0 is its own): the other
                # ranks, with no error window, would recompute every block in every pass
                replay.ok, replay.structure = acts.world.from_root(lambda: (replay.ok, replay.structure))
            owners = solve_owners(mods, spec, acts.world)
            Hs = hooks.hessians(acts.world, owners)
            recorded = hooks.recorded
            with timing.phase("forward"):
                trim_heap(collect=False)  # the pass's freed activations
            del hooks  # Hs is now the only reference: each H is freed as soon as its module is done
            out |= share_layer(layer, i, spec, _quantize_modules(i, spec, plan, cfg, mods, Hs), owners, acts.world)
            with timing.phase("params"):
                trim_heap(collect=False)  # the group's freed H and GPTQ temporaries back to the OS
            done |= set(group)
            replay.start(recorded)
        if data is not None:
            replay.stop()  # every weight of the layer changes: nothing recorded is valid any more
            out, refined = _refine(layer, i, spec, out, fp, data, cfg, acts)
        err = advance(layer, acts, ref_out, replay)
    finally:
        replay.stop()
    with timing.phase("forward"):
        trim_heap()
    layer.to(home)
    return out, LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()},
                            experts=report, refine=refined)


def _refine_start(layer, spec: ArchSpec, cfg: GPTQConfig, acts: Activations):
    """With cfg.refine: the layer's fp weights and the refinement's inputs (this layer's inputs, before any pass)."""
    if not cfg.refine:
        return None, None
    fp = {rel: weight_of(layer.get_submodule(rel), spec).detach().to(torch.float32, copy=True) for rel in spec.linears}
    return fp, RefineData(acts, cfg)


def _refine(layer, i: int, spec: ArchSpec, out: dict, fp: dict, data: RefineData, cfg: GPTQConfig,
            acts: Activations) -> tuple[dict, dict]:  # fmt: skip
    out, rep = refine_layer(layer, i, spec, out, fp, data, cfg, acts.world)
    if data.fp_xs is not None:
        acts.refine_fp = data.targets  # the fp model's outputs: the next layer's fp inputs
    if rep["kept"]:
        install_dequantized(layer, i, spec, out)
    return out, rep



@torch.no_grad()
def gptq_layer_fp(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig,
                  acts: Activations) -> tuple[dict, LayerReport]:
    """GPTQ with every linear's H from full-precision inputs: one pass of the fp layer over every window
    accumulates all H and gives the next layer's (fp) inputs; then every linear is quantized. `acts`
    holds the fp model's activations, so on resume a finished layer is advanced with its fp weights.
    Unlike the sequential path, all of the layer's distinct H are alive at once (4 for a Llama layer)."""
    t0 = time.perf_counter()
    spec = spec.at(i)
    home = next(layer.parameters()).device
    layer.to(acts.device)
    mods = {rel: layer.get_submodule(rel) for rel in spec.linears if not spec.expert(rel)}
    for rel, mod in mods.items():
        check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
    hooks = _HessianHooks(mods, stop=False)
    recs = {s: experts.Recorder(layer.get_submodule(s), acts.act_device, stop=False) for s in spec.experts}
    # the first windows' inputs, for the error report (their fp outputs replace them in acts)
    sample = replace(acts, inps=acts.inps[: error_windows(acts)])
    fp, data = _refine_start(layer, spec, cfg, acts)
    timing.count("passes")
    try:
        for k, x in enumerate(acts.inps):
            hooks.new_window()
            with timing.phase("forward"):
                acts.inps[k] = _run_layer(layer, x, acts.args, acts.kwargs, acts.device).to(acts.act_device)
    finally:
        hooks.remove()
        for r in recs.values():
            r.remove()
    owners = solve_owners(mods, spec, acts.world)
    Hs = hooks.hessians(acts.world, owners)
    del hooks
    out = share_layer(layer, i, spec, _quantize_modules(i, spec, plan, cfg, mods, Hs), owners, acts.world)
    report = {}
    for s, r in recs.items():  # each expert's gate/up from fp inputs; its down from its quantized gate/up's output
        q, report[s] = experts.quantize_experts(layer, i, spec, s, plan, cfg, acts, r.calls)
        out |= q
    del recs
    refined: dict = {}
    if data is not None:  # on the fp model's inputs, towards the fp layer's outputs
        out, refined = _refine(layer, i, spec, out, fp, data, cfg, acts)
    err = advance(layer, sample, ref_out=acts.inps[: len(sample.inps)], phase="error")  # sample.inps: quantized outputs
    with timing.phase("forward"):
        trim_heap()
    layer.to(home)
    return out, LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()},
                            experts=report, refine=refined)


def log_layer(rep: LayerReport, bar, quiet: bool) -> None:
    err = f", relative output error {rep.rel_error:.4f}" if rep.rel_error is not None else ""
    parts = [f"{p} {s:.1f}" for p, s in rep.phases.items() if s >= 0.05]
    inner = "; ".join(x for x in (f"{rep.passes} passes" if rep.passes else "", ", ".join(parts)) if x)
    msg = f"layer {rep.index}: {rep.seconds:.1f}s{f' ({inner})' if inner else ''}{err}"
    log.debug(msg) if quiet else bar.write(msg)

