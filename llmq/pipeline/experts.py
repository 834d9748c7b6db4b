"""An expert set (moe.LinearExperts) as one unit of the layer loop: every expert quantized on the tokens routed to it.

One pass of the layer (the finished blocks replayed) records what the experts module is called with, per window:
the hidden states [T, H] and the router's top-k index and weights — the router of the current, partially quantized
layer. Nothing else is kept: the experts' inputs are slices of those hidden states. Then, `experts_per_pass` experts at
a time (bounded memory: the chunk's gate/up Hessians [H, H] exist only while they are solved, then its down Hessians
[I, I]):

  1. each expert's gate/up H from the tokens routed to it (gate and up share it), summed over the windows (and over
     the ranks, onto the expert's owner); GPTQ of gate and up; the dequantized weights installed (on every rank);
  2. each expert's down H from its quantized gate/up's output on the same tokens; GPTQ of down; installed.

An expert that receives fewer than `expert_min_tokens` tokens (default: its input width, below which its H is rank
deficient) gets the policy (`GPTQConfig.expert_policy`):
  "layer" (default)  its H from every token of the layer (routed or not), its own weights still GPTQ'd;
  "rtn"              round to nearest (no H);
  "all"              not a fallback: every expert's H from every token, llm-compressor's moe_calibrate_all_experts.
Measured side by side on SmolLM2 upcycled into 8 experts: benchmarks/results/moe.md. The layer report lists the tokens
routed to each expert and the experts the policy applied to.
"""
from __future__ import annotations

import logging

import torch

from .. import moe, timing
from ..algorithms.gptq import solve_cost
from ..archs import ArchSpec
from ..config import GPTQConfig, QuantPlan
from ..lazy import trim_heap
from ..qtensor import QuantizedWeight
from .activations import Activations, _pass
from .hessian import _Stop, accumulate_xtx, symmetrize
from .solve import check_finite, quantize_linear

log = logging.getLogger("llmq")
HESSIAN_BUDGET = 8 << 30  # bytes of fp32 expert Hessians alive at once, when --experts-per-pass is not given


def experts_per_pass(cfg: GPTQConfig, hidden: int, inter: int, n: int) -> int:
    """Experts solved together: cfg.experts_per_pass, else as many as HESSIAN_BUDGET holds (a chunk holds its gate/up
    Hessians [H, H], then its down Hessians [I, I]: max(H², I²) fp32 per expert)."""
    if cfg.experts_per_pass:
        return max(1, min(n, cfg.experts_per_pass))
    return max(1, min(n, HESSIAN_BUDGET // (4 * max(hidden, inter) ** 2)))


class Recorder:
    """Forward pre-hook on the experts module: keeps (hidden, index, weights) per window on `device`, then stops the
    pass (unless `stop` is False: the error windows run whole). Duck-types _HessianHooks for _pass."""

    def __init__(self, module: moe.LinearExperts, device, stop: bool = True):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.stop = stop
        self.device = device
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def new_window(self) -> None:
        pass

    def _hook(self, module, args, kwargs):
        h, idx, w = module.routing(args, kwargs)
        self.calls.append((h.detach().to(self.device), idx.detach().to(self.device), w.detach().to(self.device)))
        if self.stop:
            raise _Stop

    def remove(self) -> None:
        self.handle.remove()


def record_inputs(layer, set_path: str, acts: Activations, replay=None, full: int = 0, ref=None) -> list:
    """What the experts module at `set_path` is called with on every window (one pass, stopped there)."""
    rec = Recorder(layer.get_submodule(set_path), acts.act_device)
    try:
        _pass(layer, acts, rec, replay, full=full, ref=ref)
    finally:
        rec.remove()
    return rec.calls


@torch.no_grad()
def quantize_experts(layer, i: int, spec: ArchSpec, set_path: str, plan: QuantPlan, cfg: GPTQConfig,
                     acts: Activations, calls: list) -> tuple[dict[str, QuantizedWeight], dict]:  # fmt: skip
    """GPTQ of every expert of the set from the recorded calls (module docstring); the dequantized weights installed.
    Returns ({full linear name: QuantizedWeight}, the set's report: tokens per expert, policy, where it applied)."""
    experts: moe.LinearExperts = layer.get_submodule(set_path)
    world, dev = acts.world, acts.device
    E = experts.num_experts
    prefix = f"{spec.layers}.{i}.{set_path}"
    for e in range(E):
        for p in moe.PROJS:
            check_finite(experts[e].get_parameter(f"{p}.weight"), f"{prefix}.{e}.{p}")
    routed = [0.0] * E
    for _, idx, _ in calls:
        routed = [a + b for a, b in zip(routed, torch.bincount(idx.flatten().long(), minlength=E)[:E].tolist())]
    routed = [int(x) for x in world.sum(routed)]
    all_tokens = int(world.sum([float(sum(h.shape[0] for h, _, _ in calls))])[0])
    min_tokens = cfg.expert_min_tokens if cfg.expert_min_tokens is not None else experts.hidden
    starved = [e for e in range(E) if routed[e] < min_tokens] if cfg.expert_policy != "all" else []
    everything = set(range(E)) if cfg.expert_policy == "all" else set(starved) if cfg.expert_policy == "layer" else set()
    no_h = set(starved) if cfg.expert_policy == "rtn" else set()
    owners = world.owners({str(e): solve_cost(experts.inter, experts.hidden) * 2 + solve_cost(experts.hidden, experts.inter)
                           for e in range(E)})  # fmt: skip
    chunk = experts_per_pass(cfg, experts.hidden, experts.inter, E)
    out: dict[str, QuantizedWeight] = {}
    for lo in range(0, E, chunk):
        ids = list(range(lo, min(E, lo + chunk)))
        for projs in (("gate_proj", "up_proj"), ("down_proj",)):
            Hs = _hessians(experts, ids, projs[0], calls, everything, no_h, dev, world, owners)
            mine: dict[str, QuantizedWeight] = {}
            for e in ids:
                if owners[str(e)] != world.rank:
                    continue
                H = Hs.pop(e, None)
                for p in projs:
                    name = f"{prefix}.{e}.{p}"
                    W = experts[e].get_parameter(f"{p}.weight")
                    mine[name] = quantize_linear(W.to(dev), H, plan, name, cfg)
                del H
            got = world.share(mine, {f"{prefix}.{e}.{p}": owners[str(e)] for e in ids for p in projs})
            with timing.phase("params"):
                for name, qw in got.items():
                    mod = experts[int(name[len(prefix) + 1:].split(".")[0])].get_submodule(name.rpartition(".")[2])
                    mod.weight.copy_(qw.dequantize(mod.weight.dtype).to(mod.weight.device))
                # the chunk's Hessians and GPTQ temporaries (each below glibc's mmap threshold, so from the heap, between
                # the small packed results that stay) back to the OS: without it the heap grows chunk by chunk
                trim_heap(collect=False)
            out |= got
    report = {"tokens": routed, "calibration_tokens": all_tokens, "min_tokens": int(min_tokens),
              "policy": cfg.expert_policy, "applied_to": sorted(everything | no_h) if cfg.expert_policy != "all" else
              list(range(E)), "experts_per_pass": chunk}  # fmt: skip
    if starved:
        log.info("layer %d %s: %d expert(s) got fewer than %d tokens (%s); policy %r", i, set_path, len(starved),
                 min_tokens, ", ".join(f"{e}: {routed[e]}" for e in starved[:8]), cfg.expert_policy)  # fmt: skip
    return out, report


def _hessians(experts: moe.LinearExperts, ids: list[int], proj: str, calls: list, everything: set, no_h: set, dev,
              world, owners) -> dict[int, torch.Tensor]:  # fmt: skip
    """H = 2XᵀX/n of `proj`'s input for each expert of `ids` (not those in no_h), from the tokens routed to it (every
    token for those in `everything`), summed over windows and ranks onto the expert's owner."""
    width = experts.hidden if proj != "down_proj" else experts.inter
    todo = [e for e in ids if e not in no_h]
    H = {e: torch.zeros(width, width, dtype=torch.float32, device=dev) for e in todo}
    n = dict.fromkeys(todo, 0.0)
    for h, idx, _ in calls:
        h = h.to(dev)
        for e in todo:
            x = h if e in everything else h[experts.tokens_of(e, idx.to(dev))[1]]
            if not len(x):
                continue
            with timing.phase("forward" if proj == "down_proj" else "hessian"):
                if proj == "down_proj":
                    x = experts.act_input(e, x)
            with timing.phase("hessian"):
                xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
                accumulate_xtx(H[e], xf)
                n[e] += xf.shape[0]
        del h
    n = dict(zip(todo, world.sum([n[e] for e in todo])))
    got = world.reduce({e: H.pop(e) for e in todo}, {e: [owners[str(e)]] for e in todo})
    for e, h in got.items():
        symmetrize(h).mul_(2.0 / max(n[e], 1.0))
        if n[e] == 0:  # never routed to and no fallback H: an all-zero H; GPTQ's damping makes that RTN-like
            h.diagonal().add_(1.0)
    return got
