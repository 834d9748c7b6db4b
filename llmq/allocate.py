"""Mixed precision: one scheme per linear, least total estimated damage within a bits-per-weight budget.

A multiple-choice knapsack: minimise Σ_l d_l(s_l) subject to Σ_l bytes_l(s_l) ≤ budget, one scheme s_l per
linear l, with budget = target_bpw · Σ_l weights_l / 8 (bytes as stored: codes, scales, zeros, outliers).

Solved by dynamic programming over the byte budget. Byte costs are first divided by their greatest common
divisor; when the budget then spans at most `max_cells` units the DP is exact. Otherwise costs are rounded
*up* to a coarser unit, so whatever the DP picks still fits the true budget, and the leftover bytes are
spent greedily (best damage saved per byte) — the result is within one unit per linear of the optimum.

`allocate_rows` chooses per *output row* instead (--granularity row): the same estimate kept row by row, a
Lagrangian price on bytes bisected until the exact stored bytes of the row-split linears fit.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cache, reduce

import numpy as np

from .config import QuantPlan, RowSplit
from .errors import LlmqError
from .qtensor import expected_layout, layout_nbytes


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


@dataclass
class RowAllocation:
    """Per linear: the scheme name of every output row (`part` indexes `names`)."""

    names: dict[str, list[str]]  # linear -> the scheme names its rows use
    part: dict[str, list[int]]  # linear -> per row, an index into names[linear]
    bits_per_weight: float
    damage: float
    budget_bytes: int
    used_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def counts(self) -> dict[str, int]:
        """Rows per scheme, over all linears."""
        out: dict[str, int] = {}
        for lin, names in self.names.items():
            for k, n in enumerate(np.bincount(self.part[lin], minlength=len(names)).tolist()):
                out[names[k]] = out.get(names[k], 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@cache
def piece_bytes(rows: int, cols: int, scheme) -> int:
    """Exact stored bytes of `rows` rows of a [*, cols] weight under `scheme` (qtensor.expected_layout)."""
    if scheme.outliers:
        raise LlmqError(f"scheme {scheme.describe()}: outliers are not supported when schemes are chosen per "
                        "output row (their count is not known before quantizing); drop it from --candidates")  # fmt: skip
    return layout_nbytes(expected_layout((rows, cols), scheme))


def allocate_rows(row_damage: dict[str, dict], shapes: dict[str, tuple[int, int]], schemes: dict,
                  target_bpw: float, iters: int = 50) -> RowAllocation:  # fmt: skip
    """One scheme per *output row*: minimise Σ_rows damage subject to the stored bytes ≤ target_bpw · weights / 8.

    row_damage[linear][scheme] = the estimated damage of each row [R], array or CPU tensor (llmq.sensitivity
    keeps them, SensitivityTable.row_shapes gives `shapes`: the
    estimate is a sum over rows, and GPTQ quantizes rows independently); schemes: name -> QuantScheme.
    Lagrangian relaxation: for a price λ every row takes argmin damage + λ · (its share of the scheme's
    bytes); λ is bisected until the *exact* bytes fit — each linear's pieces counted with
    qtensor.expected_layout for their row counts, plus one uint8 index per row of a linear that uses more
    than one scheme. With ~10⁵ rows the unspent budget is a few rows' worth."""
    names = list(row_damage)
    if not names:
        raise LlmqError("nothing to allocate: the sensitivity table is empty")
    total_w = sum(shapes[n][0] * shapes[n][1] for n in names)
    budget = math.floor(target_bpw * total_w / 8)
    opts = {n: list(row_damage[n]) for n in names}
    D = {n: np.stack([np.asarray(row_damage[n][s], dtype=np.float64) for s in opts[n]]) for n in names}
    full = {n: np.array([piece_bytes(shapes[n][0], shapes[n][1], schemes[s]) for s in opts[n]], float) for n in names}
    cheapest = sum(full[n].min() for n in names)
    if cheapest > budget:
        raise LlmqError(f"--target-bpw {target_bpw:g} is below the smallest candidate mix: the cheapest scheme for "
                        f"every linear needs {8 * cheapest / total_w:.4f} bits per weight; raise the target or add "
                        "smaller candidates (e.g. int2-g64)")  # fmt: skip

    def choose(lam: float) -> tuple[dict[str, np.ndarray], int]:
        pick, used = {}, 0
        for n in names:
            R, C = shapes[n]
            k = (D[n] + lam * (full[n] / R)[:, None]).argmin(0)
            pick[n] = k
            counts = np.bincount(k, minlength=len(opts[n]))
            used += sum(piece_bytes(int(c), C, schemes[opts[n][j]]) for j, c in enumerate(counts) if c)
            used += R if (counts > 0).sum() > 1 else 0
        return pick, used

    lo, hi = 0.0, 1.0
    while choose(hi)[1] > budget:
        hi *= 2
        if hi > 1e30:  # rounding of the pieces' blocks: fall back to the cheapest scheme everywhere
            break
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if choose(mid)[1] > budget else (lo, mid)
    pick, used = choose(hi)
    if used > budget:
        pick = {n: np.full(shapes[n][0], int(full[n].argmin())) for n in names}
        used = int(sum(full[n].min() for n in names))
    out_names, out_part = {}, {}
    for n in names:
        used_k = sorted(set(pick[n].tolist()))
        remap = {k: i for i, k in enumerate(used_k)}
        out_names[n] = [opts[n][k] for k in used_k]
        out_part[n] = [remap[k] for k in pick[n].tolist()]
    dmg = float(sum(D[n][pick[n], np.arange(shapes[n][0])].sum() for n in names))
    return RowAllocation(out_names, out_part, 8 * used / total_w, dmg, budget, int(used))


def row_plan(alloc: RowAllocation, schemes: dict) -> QuantPlan:
    """A QuantPlan for a row allocation: a linear whose rows all use one scheme gets it as an override (or as
    the default, the most common one); the others are split by row (config.RowSplit)."""
    whole = {n: ns[0] for n, ns in alloc.names.items() if len(ns) == 1}
    default = Counter(whole.values()).most_common(1)[0][0] if whole else next(iter(alloc.names.values()))[0]
    splits = {n: RowSplit(tuple(schemes[s] for s in ns), tuple(alloc.part[n]))
              for n, ns in alloc.names.items() if len(ns) > 1}  # fmt: skip
    return QuantPlan(schemes[default], {n: schemes[s] for n, s in whole.items() if s != default}, splits)


def plan_for(choice: dict[str, str], schemes: dict) -> QuantPlan:
    """A QuantPlan for an allocation's choice (linear -> scheme name): the most common scheme as default,
    every other linear overridden."""
    default = Counter(choice.values()).most_common(1)[0][0]
    return QuantPlan(schemes[default], {n: schemes[s] for n, s in choice.items() if s != default})
