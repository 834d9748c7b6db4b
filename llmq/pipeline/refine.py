"""Refinement of a quantized decoder layer (GPTQConfig.refine): every linear's rounding and clip factors
(algorithms/refine.py) trained by signed gradient descent (AutoRound's) on the layer's output.

The data: the first `refine_seqlen` tokens of each calibration window (a prefix: causal attention makes it exact),
as the quantized model feeds the layer; the target (refine_target "fp", the default): the fp model's own output of
the layer, its inputs carried from layer to layer beside the activations, so the layer also makes up for the error
the layers before it left; ("quantized": the full-precision layer's output on the quantized model's inputs). The loss:
each token's relative squared error, averaged (_loss). One
window per step per rank (torchrun: each rank its own windows, gradients summed over the ranks, so every rank
takes the same step), windows in a seeded order, learning rate falling linearly to 0. The layer is scored before
and after on SCORE_WINDOWS of the prefixes (scoring all 32 cost 64 forwards of a prefix, beside the ~150 forwards'
worth of 50 steps); a refinement that does not lower that loss is dropped (GPTQ's codes kept)."""
from __future__ import annotations

import logging
import time

import torch
from torch.func import functional_call

from .. import timing
from ..algorithms.refine import Rounding
from ..archs import ArchSpec
from ..config import GPTQConfig
from .activations import Activations

log = logging.getLogger("llmq")

SCORE_WINDOWS = 8  # prefixes scored before and after, over all ranks


def prefix(obj, L: int, T: int):
    """The layer arguments for the first T of L tokens: a [B, L] or [B, L, D] tensor is cut along dim 1, a
    [B, H, L, L] attention mask along its last two; tuples, lists and dicts recursively; T == L: unchanged."""
    if T >= L:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() in (2, 3) and obj.shape[1] == L:
            return obj[:, :T]
        if obj.dim() == 4 and obj.shape[-1] == L and obj.shape[-2] == L:
            return obj[..., :T, :T]
        return obj
    if isinstance(obj, tuple):
        return tuple(prefix(o, L, T) for o in obj)
    if isinstance(obj, list):
        return [prefix(o, L, T) for o in obj]
    if isinstance(obj, dict):
        return {k: prefix(v, L, T) for k, v in obj.items()}
    return obj


class RefineData:
    """This rank's refinement inputs (window prefixes) and the layer arguments cut to them."""

    def __init__(self, acts: Activations, cfg: GPTQConfig):
        L = acts.inps[0].shape[1] if acts.inps else 0
        self.T = min(cfg.refine_seqlen, L)
        self.xs = [x[:, : self.T].clone() for x in acts.inps]
        self.args, self.kwargs = prefix(acts.args, L, self.T), prefix(acts.kwargs, L, self.T)
        self.device = acts.device
        self.fp_xs = None  # refine_target "fp": the fp model's inputs of the layer, whose fp outputs are the targets
        if cfg.refine_target == "fp":
            self.fp_xs = acts.refine_fp if acts.refine_fp is not None else [x.clone() for x in self.xs]
        self.targets: list = []


@torch.no_grad()
def advance_fp(layer, acts: Activations, cfg: GPTQConfig) -> None:
    """refine_target "fp", resuming: the fp model's prefixes through a finished layer's fp weights (still loaded)."""
    data = RefineData(acts, cfg)
    acts.refine_fp = [_forward(layer, {}, x, data) for x in data.fp_xs]


def _forward(layer, weights: dict, x, data: RefineData):
    out = functional_call(layer, weights, (x.to(data.device), *data.args), data.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _weights(Ws: dict[str, torch.Tensor], spec: ArchSpec, device) -> dict[str, torch.Tensor]:
    """{rel: W [out, in]} -> the layer's parameters by name, as functional_call takes them."""
    return {f"{rel}.weight": (W.t() if spec.transposed else W).to(device) for rel, W in Ws.items()}


def _rounded(roundings: dict[str, Rounding]) -> dict[str, torch.Tensor]:
    return {rel: r.weight() for rel, r in roundings.items()}


def _loss(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each token's relative squared error ‖y − t‖² / ‖t‖², averaged over the tokens. Per token, not over the whole
    window: a window's first token carries the model's massive activations (SmolLM2's layer 15: 98% of the squared
    norm of a 512-token prefix), and a window-wide ratio would train the rounding on that one token."""
    e = (y - t).float().square().sum(-1) / t.float().square().sum(-1).clamp_min(1e-30)
    return e.mean()


@torch.no_grad()
def _score(layer, w: dict, data: RefineData, targets, world) -> float:
    """Mean relative squared output error over the first SCORE_WINDOWS prefixes (split over the ranks), with the
    linears' weights `w`."""
    k = -(-SCORE_WINDOWS // world.size)  # this rank's share
    tot = sum(_loss(_forward(layer, w, x, data), t).item() for x, t in zip(data.xs[:k], targets[:k]))
    tot, n = world.sum([tot, float(len(data.xs[:k]))])
    return tot / max(n, 1.0)


def refine_layer(layer, i: int, spec: ArchSpec, q: dict, fp: dict[str, torch.Tensor], data: RefineData,
                 cfg: GPTQConfig, world) -> tuple[dict, dict]:  # fmt: skip
    """Refine layer i's quantized linears q ({full name: QuantizedWeight}) from their fp weights `fp` ({rel: W}).
    Returns (the refined q, the report: loss before / after, steps, seconds, kept). The caller installs them."""
    t0 = time.perf_counter()
    spec = spec.at(i)
    rels = [rel for rel in spec.linears if f"{spec.layers}.{i}.{rel}" in q]
    with timing.phase("refine"), torch.enable_grad():
        roundings = {rel: Rounding(fp[rel], q[f"{spec.layers}.{i}.{rel}"], cfg.refine_clip, data.device)
                     for rel in rels}  # fmt: skip
        frozen = [p for p in layer.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                ref = _weights({rel: fp[rel] for rel in rels}, spec, data.device)
                targets = [_forward(layer, ref, x, data) for x in (data.fp_xs if data.fp_xs is not None else data.xs)]
                data.targets = targets
                del ref
                before = _score(layer, _weights(_rounded(roundings), spec, data.device), data, targets, world)
            params = [p for r in roundings.values() for p in r.params()]
            t_steps = time.perf_counter()
            lr = cfg.refine_lr
            gen = torch.Generator().manual_seed(1000 + i)
            order: list[int] = []
            for step in range(cfg.refine):
                if data.xs:
                    if not order:
                        order = torch.randperm(len(data.xs), generator=gen).tolist()
                    k = order.pop()
                    w = _weights(_rounded(roundings), spec, data.device)
                    loss = _loss(_forward(layer, w, data.xs[k], data), targets[k])
                    loss.backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if world.active:
                    flat = world.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
                    grads = list(torch.split(flat, [p.numel() for p in params]))
                step_lr = lr * (1 - step / cfg.refine)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(torch.sign(g.reshape(p.shape)), alpha=-step_lr)
                        p.grad = None
            t_steps = time.perf_counter() - t_steps
            done = {rel: r.finish() for rel, r in roundings.items()}
            w = _weights({rel: qw.dequantize() for rel, qw in done.items()}, spec, data.device)
            after = _score(layer, w, data, targets, world)  # as stored: scales re-stored, codes final
            out = {f"{spec.layers}.{i}.{rel}": qw for rel, qw in done.items()}
        finally:
            for p in frozen:
                p.requires_grad_(True)
        kept = after < before
        out = out if kept else {}
    tokens = int(world.sum([float(data.T * len(data.xs))])[0])  # every rank's
    report = {"steps": cfg.refine, "tokens": tokens, "loss_before": before, "loss_after": after, "kept": kept,
              "seconds": round(time.perf_counter() - t0, 2), "step_seconds": round(t_steps, 2)}  # fmt: skip
    log.debug("layer %d refine: loss %.5g -> %.5g%s", i, before, after, "" if kept else " (GPTQ kept)")
    return q | out, report
