"""Mixed precision for a whole model: measure every linear's sensitivity to every candidate scheme, allocate the
schemes to a bits-per-weight budget, and return the QuantPlan (llmq/sensitivity.py measures, llmq/allocate.py
allocates).

`mixed_plan` does it for a model in memory. `conversion_plan` does it for `llmq quantize`, whose model streams
from disk: the fp model is held whole for the backward pass, then released; the table and the allocation are kept
in OUT (sensitivity.json; per output row also sensitivity_rows.safetensors), so that a resumed conversion reuses
them instead of measuring again.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

from .allocate import allocate, allocate_rows, plan_for, row_plan
from .archs import decoder_layers, quantizable_names
from .checkpoint import atomic_save_tensors, atomic_write_json
from .config import DEFAULT_CANDIDATES, GPTQConfig, MixedConfig, scheme_from_name
from .distributed import World
from .sensitivity import SensitivityTable, layer_stats, sensitivity_table

log = logging.getLogger("llmq")
SENSITIVITY_NAME = "sensitivity.json"
ROW_DAMAGE_NAME = "sensitivity_rows.safetensors"  # --granularity row: the damage of every output row


def mixed_plan(model, calib, target_bpw: float, candidates: dict | None = None, method: str = "gptq", cfg=None,
               quiet: bool = True):  # fmt: skip
    """Measure sensitivity on `calib` [N, L] windows, allocate schemes to meet `target_bpw`.

    Returns (QuantPlan, Allocation, SensitivityTable). `candidates`: name -> QuantScheme (default:
    config.DEFAULT_CANDIDATES)."""
    candidates = candidates or {n: scheme_from_name(n, clip_search=method == "gptq") for n in DEFAULT_CANDIDATES}
    stats = layer_stats(model, calib, quiet)
    table = sensitivity_table(model, stats, candidates, method, cfg, quiet)
    alloc = allocate(table.damage, table.nbytes, table.weights, target_bpw)
    return plan_for(alloc.choice, table.schemes), alloc, table


def _saved_table(path: Path, rows_path: Path, rows: bool) -> SensitivityTable | None:
    """The table an interrupted conversion measured and kept in OUT, or None."""
    if not (path.is_file() and (rows_path.is_file() or not rows)):
        return None
    table = SensitivityTable.from_dict(json.loads(path.read_text())["table"])
    if rows:
        table.row_damage = {}
        for key, v in load_file(rows_path).items():
            lin, _, scheme = key.rpartition("/")
            table.row_damage.setdefault(lin, {})[scheme] = v
    log.info("sensitivity: reusing %s", path)
    return table


def conversion_plan(lazy, calib, mixed: MixedConfig, base: dict, method: str, gcfg: GPTQConfig | None, out: Path,
                    quiet: bool, world: World | None = None):  # fmt: skip
    """The plan of a mixed-precision conversion of `lazy` (a lazy.LazyModel): (QuantPlan, allocation). `base`: the
    scheme fields the candidate names leave out (clip_search, scale_dtype, sym). With a world, the windows and the
    linears are split over the ranks (sensitivity.layer_stats), every rank gets the whole table, rank 0 keeps it."""
    world = world or World()
    rows = mixed.granularity == "row"
    path, rows_path = out / SENSITIVITY_NAME, out / ROW_DAMAGE_NAME
    table = world.from_root(lambda: _saved_table(path, rows_path, rows))
    if table is None:
        n = len(decoder_layers(lazy.model, lazy.spec))
        for i in range(n):
            lazy.layer(i)
        stats = layer_stats(lazy.model, calib, quiet, world=world)
        table = sensitivity_table(lazy.model, stats, mixed.schemes(**base), method, gcfg, quiet, rows=rows)
        if world.active:
            table = SensitivityTable.merge(world.gather(table), quantizable_names(lazy.model, lazy.spec))
        del stats
        for i in range(n):
            lazy.release(i)
        if rows and world.root:  # before sensitivity.json: that file's presence means the measurement is complete
            flat = {f"{lin}/{s}": d for lin, ds in table.row_damage.items() for s, d in ds.items()}
            atomic_save_tensors(rows_path, flat)
    if rows:
        alloc = allocate_rows(table.row_damage, table.row_shapes(), table.schemes, mixed.target_bpw)
        record = {k: v for k, v in alloc.to_dict().items() if k not in ("names", "part")} | {"rows": alloc.counts()}
        plan = row_plan(alloc, table.schemes)
    else:
        alloc = allocate(table.damage, table.nbytes, table.weights, mixed.target_bpw)
        record = alloc.to_dict()
        plan = plan_for(alloc.choice, table.schemes)
    if world.root:
        atomic_write_json(path, {"target_bpw": mixed.target_bpw, "allocation": record, "table": table.to_dict()})
    log.info("mixed precision: %.4f bits per weight (target %g), estimated loss increase %.4f nats; %s",
             alloc.bits_per_weight, mixed.target_bpw, alloc.damage, counts(alloc))  # fmt: skip
    return plan, alloc


def counts(alloc) -> str:
    """How many linears (or rows) got each scheme, e.g. 'nf4-g64-dq: 120, int8-g128: 12'."""
    if hasattr(alloc, "counts"):  # per row
        return ", ".join(f"{s}: {k} rows" for s, k in alloc.counts().items())
    return ", ".join(f"{s}: {k}" for s, k in Counter(alloc.choice.values()).most_common())


def summary(alloc) -> dict:
    """An allocation as summary.json and the checkpoint's `method` record it."""
    return {"bits_per_weight": round(alloc.bits_per_weight, 4), "estimated_loss_increase": alloc.damage,
            "budget_bytes": alloc.budget_bytes, "used_bytes": alloc.used_bytes, "schemes": counts(alloc)}  # fmt: skip
