"""Quantizing a layer's linears: one linear by the plan (GPTQ or RTN), which rank solves which linear, sharing
the results over the ranks, and installing the dequantized weights the next passes see."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

import torch

from .. import timing
from ..algorithms.gptq import gptq, solve_cost
from ..algorithms.rtn import rtn
from ..archs import ArchSpec, weight_of
from ..config import GPTQConfig, QuantPlan, QuantScheme
from ..distributed import World
from ..dtypes import all_finite
from ..errors import LlmqError
from ..qtensor import QuantizedWeight, RowSplitWeight

log = logging.getLogger("llmq")


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float | None = None
    modules: dict[str, float] = field(default_factory=dict)  # name -> bits per weight
    phases: dict[str, float] = field(default_factory=dict)  # timing.PHASES -> seconds (exclusive)
    passes: int = 0  # forward passes of the layer over the calibration windows (stopped early or whole)
    comm_bytes: int = 0  # bytes sent between ranks for this layer, all ranks together (distributed.py)
    replays: int = 0  # block forwards replayed from recorded inputs instead of recomputed (_Replay)
    experts: dict[str, dict] = field(default_factory=dict)  # expert set -> tokens per expert, policy (experts.py)
    refine: dict = field(default_factory=dict)  # learned rounding: loss before / after, steps, seconds (refine.py)

    def timed(self, ph: timing.Phases) -> LayerReport:
        """This report with the time and phases measured around the layer (read and write included)."""
        return replace(self, seconds=ph.total, phases=ph.report(), passes=ph.counts.get("passes", 0),
                       replays=ph.counts.get("replays", 0))  # fmt: skip


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, plan: QuantPlan, name: str,
                    cfg: GPTQConfig | None = None) -> QuantizedWeight | RowSplitWeight:  # fmt: skip
    """One linear by the plan: GPTQ with H, or RTN when H is None; a linear the plan splits by output row is
    quantized piece by piece (each piece's rows with its own scheme, the same H)."""
    cfg = cfg or GPTQConfig()
    split = plan.row_splits.get(name)
    if split is not None:  # every piece needs the whole H
        return RowSplitWeight.quantize(W, split, functools.partial(_quantize_rows, H=H, cfg=cfg, name=name))
    if H is None or (cfg.refine and cfg.refine_from == "rtn"):  # the refinement's other start: round to nearest
        return rtn(W, plan.scheme_for(name))
    handed = [H]
    del H
    return gptq(W, handed.pop(), plan.scheme_for(name), cfg, name)  # our reference handed over: gptq frees H early


def _quantize_rows(Wp: torch.Tensor, scheme: QuantScheme, H: torch.Tensor | None, cfg: GPTQConfig, name: str):
    rtn_only = H is None or (cfg.refine and cfg.refine_from == "rtn")
    return rtn(Wp, scheme) if rtn_only else gptq(Wp, H, scheme, cfg, name)


def solve_owners(mods: dict[str, torch.nn.Module], spec: ArchSpec, world: World, gptq: bool = True) -> dict[str, int]:
    """The rank that quantizes each of `mods`: by the cost of the solve, C³ + R·C² for GPTQ of W [R, C] (the
    Cholesky and the column loop), R·C for RTN."""
    shapes = {rel: weight_of(m, spec).shape for rel, m in mods.items()}
    return world.owners({rel: solve_cost(R, C) if gptq else float(R * C) for rel, (R, C) in shapes.items()})


def share_layer(layer, i: int, spec: ArchSpec, mine: dict[str, QuantizedWeight], owners: dict[str, int],
                world: World, install: bool = True) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Every linear of `owners` from its owner rank to all (in owners' order). With `install`, the ones another rank
    quantized are installed dequantized here (the owner installed its own), so every rank goes on with the same
    layer."""
    if not world.active:
        return mine
    got = world.share(mine, {f"{spec.layers}.{i}.{rel}": r for rel, r in owners.items()})  # parts on the CPU
    if install:
        install_dequantized(layer, i, spec, got, rels=[r for r in owners if f"{spec.layers}.{i}.{r}" not in mine])
    return got


def check_finite(W: torch.Tensor, name: str) -> None:
    if not all_finite(W):
        bad = (~torch.isfinite(W)).sum().item()
        raise LlmqError(f"{name}.weight has {bad} NaN/Inf value(s); the source checkpoint is damaged there. Repair "
                        "or re-download the model (llmq will not quantize non-finite weights)")  # fmt: skip



def install_dequantized(layer, i: int, spec: ArchSpec, qweights: dict[str, QuantizedWeight],
                        rels: list[str] | None = None) -> None:  # fmt: skip
    """Give the layer's linears (`rels`, default all) their dequantized weights (what the next layer will see)."""
    spec = spec.at(i)
    with torch.no_grad():
        for rel in spec.linears if rels is None else rels:
            mod = layer.get_submodule(rel)
            Wq = qweights[f"{spec.layers}.{i}.{rel}"].dequantize(mod.weight.dtype).to(mod.weight.device)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)



def _quantize_modules(i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig, mods: dict,
                      Hs: dict) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ each module from its H (popped, so each is freed when done); install the dequantized weight."""
    out = {}
    for rel in list(Hs):
        name = f"{spec.layers}.{i}.{rel}"
        mod = mods[rel]
        qw = quantize_linear(weight_of(mod, spec), Hs.pop(rel), plan, name, cfg)
        with timing.phase("params"):
            Wq = qw.dequantize(mod.weight.dtype).to(mod.weight.device)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)
        out[name] = qw
    return out

