"""Mixed precision: one scheme per linear, least total estimated damage within a bits-per-weight budget.

A multiple-choice knapsack: minimise Σ_l d_l(s_l) subject to Σ_l bytes_l(s_l) ≤ budget, one scheme s_l per
linear l, with budget = target_bpw · Σ_l weights_l / 8 (bytes as stored: codes, scales, zeros, outliers).

Solved by dynamic programming over the byte budget. Byte costs are first divided by their greatest common
divisor; when the budget then spans at most `max_cells` units the DP is exact. Otherwise costs are rounded
*up* to a coarser unit, so whatever the DP picks still fits the true budget, and the leftover bytes are
spent greedily (best damage saved per byte) — the result is within one unit per linear of the optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from .errors import LlmqError


@dataclass
class Allocation:
    choice: dict[str, str]  # linear -> scheme name
    bits_per_weight: float  # measured: 8 · Σ bytes / Σ weights
    damage: float  # Σ estimated damage of the choice
    budget_bytes: int
    used_bytes: int
    exact: bool  # the DP ran on the exact byte costs

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def allocate(damage: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], weights: dict[str, int],
             target_bpw: float, max_cells: int = 200_000) -> Allocation:  # fmt: skip
    """damage/nbytes: linear -> {scheme: value} (same schemes per linear, not necessarily the same for all
    linears); weights: linear -> out × in."""
    names = list(damage)
    if not names:
        raise LlmqError("nothing to allocate: the sensitivity table is empty")
    total_w = sum(weights[n] for n in names)
    budget = math.floor(target_bpw * total_w / 8)
    opts = [sorted(damage[n], key=lambda s: nbytes[n][s]) for n in names]
    cheapest = sum(nbytes[n][o[0]] for n, o in zip(names, opts))
    if cheapest > budget:
        raise LlmqError(f"--target-bpw {target_bpw:g} is below the smallest candidate mix: the cheapest scheme for "
                        f"every linear needs {8 * cheapest / total_w:.4f} bits per weight; raise the target or add "
                        "smaller candidates (e.g. int2-g64)")  # fmt: skip
    costs = [np.array([nbytes[n][s] for s in o], dtype=np.int64) for n, o in zip(names, opts)]
    dmg = [np.array([damage[n][s] for s in o], dtype=np.float64) for n, o in zip(names, opts)]
    unit = reduce(math.gcd, (int(c) for cs in costs for c in cs), 0) or 1
    exact = budget // unit <= max_cells
    if not exact:
        unit = math.ceil(budget / max_cells)
    ucost = [-(-cs // unit) for cs in costs]  # rounded up: a plan that fits in units fits in bytes
    cells = budget // unit
    pick = _knapsack(ucost, dmg, cells)
    if pick is None:  # rounding up made the cheapest mix not fit: fall back to it, then fill greedily
        pick = [0] * len(names)
    pick = _fill(pick, costs, dmg, budget)
    used = int(sum(c[k] for c, k in zip(costs, pick)))
    return Allocation({n: o[k] for n, o, k in zip(names, opts, pick)}, 8 * used / total_w,
                      float(sum(d[k] for d, k in zip(dmg, pick))), budget, used, exact)  # fmt: skip


def _knapsack(cost: list[np.ndarray], dmg: list[np.ndarray], cells: int) -> list[int] | None:
    """Exact multiple-choice knapsack on integer costs: min Σ dmg subject to Σ cost ≤ cells."""
    INF = np.inf
    best = np.full(cells + 1, INF)  # best[b]: least damage of the items so far using exactly b units
    best[0] = 0.0
    back = np.zeros((len(cost), cells + 1), dtype=np.int16)
    for i, (c, d) in enumerate(zip(cost, dmg)):
        new = np.full(cells + 1, INF)
        arg = np.zeros(cells + 1, dtype=np.int16)
        for k, (ck, dk) in enumerate(zip(c.tolist(), d.tolist())):
            if ck > cells:
                continue
            cand = np.full(cells + 1, INF)
            cand[ck:] = best[: cells + 1 - ck] + dk
            better = cand < new
            new[better], arg[better] = cand[better], k
        best, back[i] = new, arg
    if not np.isfinite(best).any():
        return None
    b = int(np.argmin(best))
    pick = []
    for i in range(len(cost) - 1, -1, -1):
        k = int(back[i, b])
        pick.append(k)
        b -= int(cost[i][k])
    return pick[::-1]


def _fill(pick: list[int], costs: list[np.ndarray], dmg: list[np.ndarray], budget: int) -> list[int]:
    """Spend leftover bytes: repeatedly take the switch with the most damage saved per extra byte that fits."""
    pick = list(pick)
    used = int(sum(c[k] for c, k in zip(costs, pick)))
    while True:
        best = None
        for i, (c, d) in enumerate(zip(costs, dmg)):
            k0 = pick[i]
            for k in range(len(c)):
                extra, saved = int(c[k] - c[k0]), float(d[k0] - d[k])
                if saved <= 0 or used + extra > budget:
                    continue
                rate = saved / max(extra, 1e-9)
                if best is None or rate > best[0]:
                    best = (rate, i, k, extra)
        if best is None:
            return pick
        _, i, k, extra = best
        pick[i] = k
        used += extra


def plan_for(choice: dict[str, str], schemes: dict) -> "QuantPlan":
    """A QuantPlan for an allocation's choice (linear -> scheme name): the most common scheme as default,
    every other linear overridden."""
    from collections import Counter

    from .config import QuantPlan

    default = Counter(choice.values()).most_common(1)[0][0]
    return QuantPlan(schemes[default], {n: schemes[s] for n, s in choice.items() if s != default})


def mixed_plan(model, calib, target_bpw: float, candidates: dict | None = None, method: str = "gptq", cfg=None,
               quiet: bool = True):  # fmt: skip
    """Measure sensitivity on `calib` [N, L] windows, allocate schemes to meet `target_bpw`.

    Returns (QuantPlan, Allocation, SensitivityTable). `candidates`: name -> QuantScheme (default:
    config.DEFAULT_CANDIDATES)."""
    from .config import DEFAULT_CANDIDATES, scheme_from_name
    from .sensitivity import layer_stats, sensitivity_table

    candidates = candidates or {n: scheme_from_name(n, clip_search=method == "gptq") for n in DEFAULT_CANDIDATES}
    stats = layer_stats(model, calib, quiet)
    table = sensitivity_table(model, stats, candidates, method, cfg, quiet)
    alloc = allocate(table.damage, table.nbytes, table.weights, target_bpw)
    return plan_for(alloc.choice, table.schemes), alloc, table
