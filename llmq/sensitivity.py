"""How much each linear layer's quantization hurts the model: a table of estimated loss increases.

Estimate (second order, K-FAC style): quantizing a linear W [out, in] into Ŵ changes the mean token loss by

    ΔL ≈ ½ Σ_r G_r · (W_r − Ŵ_r) A (W_r − Ŵ_r)ᵀ

with A = E_t[x_t x_tᵀ] the second moment of the layer's inputs (GPTQ's Hessian, up to a factor 2) and
G_r = E_t[g_{t,r}²] the mean squared gradient of the (summed) token loss with respect to output r. This is
the Fisher of the layer's weights under the Kronecker factorisation E[g gᵀ ⊗ x xᵀ] ≈ E[g gᵀ] ⊗ E[x xᵀ],
keeping the diagonal of the first factor (quantization errors of different rows are uncorrelated: the full factor
changed neither the estimates nor the allocations measurably, benchmarks/results/notes.md).
A alone (GPTQ's objective) measures how far the layer's *output* moves; G says how much the final loss cares
about each output — which is what separates a first-layer v_proj from a middle-layer gate_proj. Both come
from one forward + backward pass per calibration window of the full-precision model (no weight gradients
are formed: hooks read the inputs and the gradients of the outputs).

The gradients g are taken for next tokens *sampled from the model's own prediction* (fisher="true"): the
expected Fisher, which for softmax cross-entropy is the Gauss-Newton matrix, the curvature a second-order
estimate needs. The "empirical" Fisher (gradients for the data's next tokens) is a worse curvature proxy
(Kunstner et al. 2019), and measured so (benchmarks/results/notes.md).

Each candidate scheme's Ŵ comes from the method that will really be used (GPTQ with A, or RTN), so the
table holds the damage and the *measured* bytes (every part: codes, scales, zeros, outliers) of exactly
what the final checkpoint would store. benchmarks/mixed.py checks that the estimate ranks single-layer
perplexity damage correctly.

Cost: one forward + backward per window, then one GPTQ run per (linear, candidate): |candidates| × the
GPTQ time of the model. The fp model is held in memory for the backward pass.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .algorithms.gptq import gptq, solve_cost
from .algorithms.rtn import rtn
from .archs import arch_for, quantizable_names, weight_of
from .config import GPTQConfig, QuantScheme
from .distributed import World
from .errors import LlmqError
from .recipes import fitted

log = logging.getLogger("llmq")


@dataclass
class LayerStats:
    """A [in, in] = mean of x xᵀ over calibration tokens; G [out] = mean of (∂loss/∂y)² over the same tokens."""

    A: torch.Tensor
    G: torch.Tensor


@dataclass
class SensitivityTable:
    """damage[name][scheme name] (estimated mean-token-loss increase, nats) and nbytes[name][scheme name]
    (stored bytes) for every quantizable linear; `weights[name]` = out × in; `schemes` by name."""

    schemes: dict[str, QuantScheme]
    damage: dict[str, dict[str, float]] = field(default_factory=dict)
    nbytes: dict[str, dict[str, int]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    method: str = "gptq"
    seconds: float = 0.0
    row_damage: dict[str, dict[str, torch.Tensor]] | None = None  # per output row [R] (sensitivity_table(rows=True))

    def row_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every linear with row damages (allocate.allocate_rows's `shapes`)."""
        rows = {n: len(next(iter(ds.values()))) for n, ds in (self.row_damage or {}).items()}
        return {n: (R, self.weights[n] // R) for n, R in rows.items()}

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds": round(self.seconds, 2),
                "schemes": {k: s.to_dict() for k, s in self.schemes.items()}, "weights": self.weights,
                "damage": self.damage, "nbytes": self.nbytes}  # fmt: skip

    @classmethod
    def merge(cls, parts: list[SensitivityTable], names: list[str]) -> SensitivityTable:
        """One table from the tables of disjoint sets of linears (the ranks of a distributed run), in `names` order."""
        t = cls(parts[0].schemes, method=parts[0].method, seconds=max(p.seconds for p in parts),
                row_damage={} if parts[0].row_damage is not None else None)  # fmt: skip
        owner = {n: p for p in parts for n in p.damage}
        for n in names:
            p = owner[n]
            t.damage[n], t.nbytes[n], t.weights[n] = p.damage[n], p.nbytes[n], p.weights[n]
            if t.row_damage is not None:
                t.row_damage[n] = p.row_damage[n]
        return t

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityTable:
        return cls({k: QuantScheme.from_dict(v) for k, v in d["schemes"].items()}, d["damage"], d["nbytes"],
                   d["weights"], d.get("method", "gptq"), d.get("seconds", 0.0))  # fmt: skip


FISHER = ("true", "empirical")


def layer_stats(model, calib: torch.Tensor, quiet: bool = True, fisher: str = "true",
                seed: int = 0, world: World | None = None) -> dict[str, LayerStats]:  # fmt: skip
    """One forward + backward of next-token loss per calibration window [N, L] through the full-precision
    model; returns A and G for every quantizable linear (fp32, on the CPU). fisher="true": the loss of next
    tokens drawn from the model's softmax (a torch.Generator seeded from `seed` and the window's index, so a window
    draws the same tokens however the windows are split); "empirical": the loss of the window's own next tokens.

    With a world (distributed.py), each rank runs its share of the windows and the sums of each linear are added
    onto the rank that will measure it (`owners`, by the cost of its GPTQ solves): only that rank's linears are
    returned."""
    world = world or World()
    ids = world.windows(len(calib))
    calib = calib[ids]
    if fisher not in FISHER:
        raise LlmqError(f"fisher={fisher!r} is not known; use one of {', '.join(FISHER)}")
    spec = arch_for(model.config)
    names = quantizable_names(model, spec)
    A: dict[str, torch.Tensor] = {}
    G: dict[str, torch.Tensor] = {}
    count = {n: 0 for n in names}

    def hook(name):
        def fwd(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # [tokens, in]
            A[name] = A[name].addmm_(x.t(), x) if name in A else x.t() @ x
            count[name] += x.shape[0]

            def bwd(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float().square().sum(0)  # [out]
                G[name] = G[name] + g2 if name in G else g2

            output.register_hook(bwd)

        return fwd

    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    emb = model.get_input_embeddings()
    gen = torch.Generator(device=emb.weight.device)
    try:
        for p in params:
            p.requires_grad_(False)
        for k, row in zip(ids, tqdm(calib, desc="sensitivity: gradients", unit="window", disable=quiet)):
            gen.manual_seed(seed * 1_000_003 + k)
            ids = row.unsqueeze(0).to(emb.weight.device)
            x = emb(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits.float()[0, :-1]
            labels = next_tokens(logits, ids[0, 1:], fisher, gen)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
    missing = [n for n in names if n not in G]
    if missing:
        raise LlmqError(f"sensitivity: no gradient reached {missing[0]} (and {len(missing) - 1} more); is the "
                        "model's output independent of it?")  # fmt: skip
    if world.active:
        shapes = {n: weight_of(model.get_submodule(n), spec).shape for n in names}
        mine = world.owners({n: solve_cost(R, C) for n, (R, C) in shapes.items()})
        count = dict(zip(names, world.sum([float(count[n]) for n in names])))
        A = world.reduce(A, {n: [mine[n]] for n in names})
        G = world.reduce(G, {n: [mine[n]] for n in names})
        names = [n for n in names if mine[n] == world.rank]
    return {n: LayerStats(A[n].cpu() / count[n], G[n].cpu() / count[n]) for n in names}


def next_tokens(logits: torch.Tensor, data: torch.Tensor, fisher: str, gen: torch.Generator) -> torch.Tensor:
    """The labels of the Fisher's loss for logits [T, V]: the data's next tokens [T] ("empirical"), or one draw
    per position from softmax(logits) ("true")."""
    if fisher == "empirical":
        return data
    return torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(1)


def damage_rows(W: torch.Tensor, W_hat: torch.Tensor, st: LayerStats) -> torch.Tensor:
    """½ G_r (W_r − Ŵ_r) A (W_r − Ŵ_r)ᵀ for every output row r of W, Ŵ [out, in] -> [out]."""
    D = (W - W_hat).float()
    return 0.5 * ((D @ st.A) * D).sum(1) * st.G


def damage(W: torch.Tensor, W_hat: torch.Tensor, st: LayerStats) -> float:
    """½ Σ_r G_r (W_r − Ŵ_r) A (W_r − Ŵ_r)ᵀ for W, Ŵ [out, in]."""
    return float(damage_rows(W, W_hat, st).sum())


def quantize_candidate(W: torch.Tensor, st: LayerStats, scheme: QuantScheme, method: str, cfg: GPTQConfig, name: str):
    """A llama.cpp block format is measured as llama.cpp stores it on this shape (its fallback where the block does
    not fit: the plan resolves it the same way, recipes.resolve_shapes)."""
    scheme = fitted(scheme, W.shape[1], name)
    return gptq(W, 2 * st.A, scheme, cfg, name) if method == "gptq" else rtn(W, scheme)


def sensitivity_table(model, stats: dict[str, LayerStats], candidates: dict[str, QuantScheme], method: str = "gptq",
                      cfg: GPTQConfig | None = None, quiet: bool = True, rows: bool = False) -> SensitivityTable:  # fmt: skip
    """Quantize every linear with every candidate scheme (`method`: "gptq" with A, or "rtn") and record the
    estimated damage and the stored bytes; rows=True also keeps the damage of every output row
    (table.row_damage, for allocate.allocate_rows)."""
    if method not in ("gptq", "rtn"):
        raise LlmqError(f"method={method!r} is not supported for sensitivity; use 'gptq' or 'rtn'")
    if not candidates:
        raise LlmqError("no candidate schemes given for mixed precision")
    cfg = cfg or GPTQConfig()
    spec = arch_for(model.config)
    t0 = time.perf_counter()
    table = SensitivityTable(dict(candidates), method=method, row_damage={} if rows else None)
    for name in tqdm(list(stats), desc=f"sensitivity: {len(candidates)} schemes", unit="linear", disable=quiet):
        W = weight_of(model.get_submodule(name), spec).detach().float()
        st = stats[name]
        table.weights[name] = W.numel()
        table.damage[name], table.nbytes[name] = {}, {}
        for key, scheme in candidates.items():
            qw = quantize_candidate(W, st, scheme, method, cfg, name)
            d = damage_rows(W, qw.dequantize(torch.float32), st)
            table.damage[name][key] = float(d.sum())
            table.nbytes[name][key] = qw.nbytes()
            if rows:
                table.row_damage.setdefault(name, {})[key] = d
    table.seconds = time.perf_counter() - t0
    log.info("sensitivity: %d linears x %d schemes in %.1fs", len(stats), len(candidates), table.seconds)
    return table
