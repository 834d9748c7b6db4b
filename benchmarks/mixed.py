"""Mixed precision on the real model: does sensitivity-driven allocation beat uniform schemes at equal size?

    python benchmarks/mixed.py [--model PATH] [--targets 3.0 3.5 4.0 4.5] [--nsamples 32] [--seqlen 512]
                               [--eval-windows 10] [--probe-linears 24] [--out mixed]

Same protocol as benchmarks/quality.py: evaluation = the first `eval-windows` windows of 2048 tokens of
WikiText-2 test; calibration = `nsamples` × `seqlen` tokens from the second half of the same token stream
(disjoint). Every model is GPTQ (act-order, static groups, clip search) through llmq's pipeline.

1. Sensitivity (llmq.sensitivity): one forward + backward per calibration window, then every linear ×
   every candidate scheme (config.DEFAULT_CANDIDATES) quantized with GPTQ; time recorded.
2. Does the estimate predict damage? For `probe-linears` linears spread over layers and types, quantize
   *only* that linear with a probe scheme (int2-g64, GPTQ) and measure the eval log-perplexity increase;
   report the Spearman rank correlation with the estimated loss increase, and estimated vs measured for the
   full mixed models too.
3. For each target bits per weight: allocate (llmq.allocate), quantize with that plan, evaluate; and every
   candidate scheme uniformly. Measured bits per weight count every stored byte.
4. Table + the report command's ppl-vs-bpw plot (benchmarks/results/mixed_ppl_vs_bpw.png).

`--recheck LABEL ...` re-runs rows of the saved results (a mixed row with its stored allocation, a uniform
row by name) with this process's torch threads (`--threads N`), calibration draw (`--calib-seed S`) and eval
windows (`--eval-windows N`, up to 74: the first half of the token stream) and adds them to the report: GPTQ at
3 bits moves by about 1% with the float summation order alone, and 10 windows (20k tokens) are a small sample,
so a close comparison is checked at other settings.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, real_setup, write_results  # noqa: E402
from llmq.eval.perplexity import perplexity, text_sha256  # noqa: E402

from llmq.allocate import allocate, allocate_rows, plan_for, row_plan  # noqa: E402
from llmq.archs import arch_for, weight_of  # noqa: E402
from llmq.config import DEFAULT_CANDIDATES, DEFAULT_ROW_CANDIDATES, GPTQConfig, QuantPlan, scheme_from_name  # noqa: E402
from llmq.modeling import fake_quantize  # noqa: E402
from llmq.pipeline import quantize  # noqa: E402
from llmq.sensitivity import layer_stats, quantize_candidate, sensitivity_table  # noqa: E402

# every uniform scheme within WINDOW above a target (3.0 / 3.5 / 4.0 / 4.5), plus a few for the frontier
UNIFORM = ("nf3-g256-dq", "int3-pc", "nf3-g128-dq", "int3-g128-dq", "nf3-g64-dq", "int3-g128", "int3-g64-dq",
           "nf3-g32-dq", "int3-g64", "int3-g32-dq", "nf3-g32", "int3-g32", "int4-pc", "nf4-g128-dq", "nf4-g64-dq",
           "nf4-g128", "int4-g128", "nf4-g64", "nf4-g32-dq", "int4-g64", "nf4-g32", "int4-g32")  # fmt: skip
PROBE = "int2-g64"
WINDOW = 0.25  # compare with uniform schemes costing the same or up to this many bits per weight more


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--targets", type=float, nargs="*", default=[3.0, 3.5, 4.0, 4.5])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--probe-linears", type=int, default=24)
    ap.add_argument("--probe-windows", type=int, default=2, help="eval windows for the single-linear probes")
    ap.add_argument("--uniform", nargs="*", default=list(UNIFORM))
    ap.add_argument("--out", default="mixed")
    ap.add_argument("--add-uniform", nargs="*", default=None, metavar="SCHEME",
                    help="only run these uniform schemes (same protocol) and add them to the existing results")
    ap.add_argument("--rows-to", default=None, metavar="FILE",
                    help="with --add-uniform: write the rows to FILE instead (to run beside a full run)")
    ap.add_argument("--merge-rows", nargs="*", default=None, metavar="FILE",
                    help="add the rows of these --rows-to files to the results and rewrite the report")
    ap.add_argument("--keep-uniform", action="store_true",
                    help="reuse the uniform rows of the existing results (they do not depend on the sensitivity "
                         "estimate) instead of re-running them")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown and plot from the JSON")
    ap.add_argument("--recheck", nargs="*", default=None, metavar="LABEL",
                    help="re-run these rows of the existing results (e.g. 'mixed 3' nf3-g64-dq) and add them as a "
                         "check of the table (see --threads, --calib-seed, --eval-windows)")
    ap.add_argument("--add-rows", action="store_true",
                    help="add mixed models with one scheme per output row (llmq quantize --granularity row; "
                         "candidates config.DEFAULT_ROW_CANDIDATES) at --targets to the existing results; with "
                         "--eval-windows above the table's, their scores there go to the re-run table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed of the calibration draw (with --recheck: another draw of the same protocol)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    m = machine()
    if a.report_only or a.merge_rows:
        payload = json.loads((RESULTS / f"{a.out}.json").read_text())
        for f in a.merge_rows or []:
            payload["rows"] += json.loads(Path(f).read_text())
        report(payload, a.out)
        return 0

    r = real_setup(a.model, a.nsamples, a.seqlen, a.eval_windows, a.calib_seed)
    src, fp_model, text, tokens, calib, eval_tokens = r.src, r.fp_model, r.text, r.tokens, r.calib, r.eval_tokens
    gcfg = GPTQConfig()
    spec = arch_for(fp_model.config)

    def ppl(model) -> float:
        return perplexity(model, eval_tokens, 2048)["perplexity"]

    def run(label, plan, kind, extra=None, also_windows=None):
        model = copy.deepcopy(fp_model)
        t = time.perf_counter()
        qw = quantize(model, plan, calib, method="gptq", gptq=gcfg)
        secs = time.perf_counter() - t
        fake_quantize(model, qw)
        bpw = 8 * sum(q.nbytes() for q in qw.values()) / sum(q.shape[0] * q.shape[1] for q in qw.values())
        row = {"label": label, "kind": kind, "perplexity": ppl(model), "bits_per_weight": bpw,
               "quant_seconds": round(secs, 1), **(extra or {})}  # fmt: skip
        if also_windows:  # the same model scored on fewer windows too (a recheck against the table's protocol)
            row["perplexity_table_windows"] = perplexity(model, eval_tokens[: also_windows * 2048], 2048)["perplexity"]
        print(f"{label}: ppl {row['perplexity']:.3f} at {bpw:.4f} bpw", flush=True)
        return row

    if a.recheck:
        payload = json.loads((RESULTS / f"{a.out}.json").read_text())
        old = {r["label"]: r for r in payload["rows"]}
        table_windows = table_eval_windows(payload)
        for label in a.recheck:
            if label not in old:
                raise SystemExit(f"{label!r} is not a row of {a.out}.json; rows: {', '.join(old)}")
            o = old[label]
            if o.get("granularity") == "row":
                raise SystemExit(f"{label!r}: a per-row allocation is not stored; re-run it with --add-rows")
            if o["kind"] == "mixed":
                schemes = {s: scheme_from_name(s, clip_search=True) for s in set(o["choice"].values())}
                plan = plan_for(o["choice"], schemes)
            else:
                plan = QuantPlan(scheme_from_name(label, clip_search=True))
            row = run(label, plan, o["kind"], also_windows=table_windows if a.eval_windows != table_windows else None)
            payload.setdefault("rechecks", []).append(
                {"label": label, "threads": torch.get_num_threads(), "calib_seed": a.calib_seed,
                 "eval_windows": a.eval_windows, "perplexity": row["perplexity"],
                 "perplexity_table_windows": row.get("perplexity_table_windows", row["perplexity"]),
                 "bits_per_weight": row["bits_per_weight"], "table_perplexity": o["perplexity"], "run": m})  # fmt: skip
        report(payload, a.out)
        return 0

    if a.add_rows:
        payload = json.loads((RESULTS / f"{a.out}.json").read_text())
        table_windows = table_eval_windows(payload)
        more = a.eval_windows != table_windows
        t0 = time.perf_counter()
        stats = layer_stats(fp_model, calib, quiet=False)
        t_stats = time.perf_counter() - t0
        cands = {n: scheme_from_name(n, clip_search=True) for n in DEFAULT_ROW_CANDIDATES}
        rt = sensitivity_table(fp_model, stats, cands, "gptq", gcfg, quiet=False, rows=True)
        del stats
        payload["protocol"]["row_sensitivity"] = {"candidates": list(DEFAULT_ROW_CANDIDATES),
                                                  "gradients_seconds": round(t_stats, 1),
                                                  "table_seconds": round(rt.seconds, 1)}  # fmt: skip
        for target in a.targets:
            al = allocate_rows(rt.row_damage, rt.row_shapes(), rt.schemes, target)
            plan = row_plan(al, rt.schemes)
            label = f"mixed-rows {target:g}"
            row = run(label, plan, "mixed",
                      {"granularity": "row", "target_bpw": target, "estimated_loss_increase": al.damage,
                       "allocation_bpw": al.bits_per_weight, "rows_per_scheme": al.counts(),
                       "split_linears": len(plan.row_splits), "run": m}, also_windows=table_windows if more else None)  # fmt: skip
            if more or a.calib_seed != 0:  # the table's perplexity is on its windows; the rest goes to the re-runs
                on_table = row.pop("perplexity_table_windows", row["perplexity"])
                in_table = next((r["perplexity"] for r in payload["rows"] if r["label"] == label), on_table)
                payload.setdefault("rechecks", []).append(
                    {"label": label, "threads": torch.get_num_threads(), "calib_seed": a.calib_seed,
                     "eval_windows": a.eval_windows, "perplexity": row["perplexity"],
                     "perplexity_table_windows": on_table, "bits_per_weight": row["bits_per_weight"],
                     "table_perplexity": on_table if a.calib_seed == 0 else in_table, "run": m})  # fmt: skip
                row["perplexity"] = on_table
            if a.calib_seed == 0:  # the table's draw: the row goes in the table (another draw is a re-run only)
                payload["rows"] = [r for r in payload["rows"] if r["label"] != label] + [row]
        report(payload, a.out)
        return 0

    if a.add_uniform:
        rows = [run(name, QuantPlan(scheme_from_name(name, clip_search=True)), "uniform",
                    {"estimated_loss_increase": None, "run": m}) for name in a.add_uniform]  # fmt: skip
        if a.rows_to:
            Path(a.rows_to).write_text(json.dumps(rows, indent=1))
            return 0
        payload = json.loads((RESULTS / f"{a.out}.json").read_text())
        payload["rows"] += rows
        report(payload, a.out)
        return 0

    fp_ppl = ppl(fp_model)
    print(f"fp {fp_ppl:.3f}", flush=True)

    # 1. sensitivity
    t0 = time.perf_counter()
    fisher = "true"
    stats = layer_stats(fp_model, calib, quiet=False, fisher=fisher)
    t_stats = time.perf_counter() - t0
    cands = {n: scheme_from_name(n, clip_search=True) for n in DEFAULT_CANDIDATES}
    table = sensitivity_table(fp_model, stats, cands, "gptq", gcfg, quiet=False)
    print(f"sensitivity: stats {t_stats:.0f}s, table {table.seconds:.0f}s", flush=True)

    # 2. single-linear probes
    names = list(stats)
    step = max(1, len(names) // a.probe_linears)
    probe_names = names[::step][: a.probe_linears]
    probe = scheme_from_name(PROBE, clip_search=True)
    probes = []
    probe_tokens = eval_tokens[: a.probe_windows * 2048]
    fp_probe = perplexity(fp_model, probe_tokens, 2048)["perplexity"]
    for name in probe_names:
        mod = fp_model.get_submodule(name)
        W = weight_of(mod, spec).detach().clone()
        qw = quantize_candidate(W, stats[name], probe, "gptq", gcfg, name)
        est = table.damage[name][PROBE] if PROBE in table.damage[name] else None
        with torch.no_grad():
            Wq = qw.dequantize(mod.weight.dtype)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)
            p = perplexity(fp_model, probe_tokens, 2048)["perplexity"]
            mod.weight.copy_(W.t() if spec.transposed else W)
        probes.append({"linear": name, "estimated_loss_increase": est, "measured_log_ppl_increase": math.log(p / fp_probe)})
        print(f"probe {name}: est {est:.4g}, measured {probes[-1]['measured_log_ppl_increase']:.4g}", flush=True)
    rho = spearman([p["estimated_loss_increase"] for p in probes], [p["measured_log_ppl_increase"] for p in probes])
    print(f"spearman {rho:.3f}", flush=True)
    del stats

    rows = []
    for target in a.targets:
        al = allocate(table.damage, table.nbytes, table.weights, target)
        counts = {}
        for s in al.choice.values():
            counts[s] = counts.get(s, 0) + 1
        rows.append(run(f"mixed {target:g}", plan_for(al.choice, table.schemes), "mixed",
                        {"target_bpw": target, "estimated_loss_increase": al.damage, "allocation_bpw": al.bits_per_weight,
                         "schemes": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "choice": al.choice}))  # fmt: skip
    if a.keep_uniform:
        old = json.loads((RESULTS / f"{a.out}.json").read_text())
        kept = [{**r, "estimated_loss_increase": None, "run": r.get("run", old["machine"])} for r in old["rows"]
                if r["kind"] == "uniform"]  # fmt: skip
        rows += kept
        print(f"kept {len(kept)} uniform rows from {a.out}.json", flush=True)
    else:
        for name in a.uniform:
            s = scheme_from_name(name, clip_search=True)
            est = sum(table.damage[n][name] for n in table.damage) if name in cands else None
            rows.append(run(name, QuantPlan(s), "uniform", {"estimated_loss_increase": est}))

    protocol = {**r.protocol, "method": "GPTQ, act-order + static groups + clip search, damp 0.01",
                "candidates": list(DEFAULT_CANDIDATES),
                "sensitivity_seconds": {"gradients": round(t_stats, 1), "table": round(table.seconds, 1)},
                "fisher": fisher,
                "linears": len(table.damage), "probe_every": step, "probe_windows": a.probe_windows,
                "dataset": {"sha256": text_sha256(text), "tokens": len(tokens)}, "model": str(src)}  # fmt: skip
    payload = {"machine": m, "protocol": protocol, "fp_perplexity": fp_ppl, "probe_scheme": PROBE, "probes": probes,
               "spearman_probe": rho, "rows": rows, "table": table.to_dict()}  # fmt: skip
    report(payload, a.out)
    return 0


def table_eval_windows(payload: dict) -> int:
    """How many eval windows the saved table's perplexities used (its protocol says 'first N windows')."""
    return int(re.search(r"first (\d+) windows", payload["protocol"]["eval"]).group(1))


def _brief(u: dict) -> dict:
    return {k: u[k] for k in ("label", "perplexity", "bits_per_weight")}


def _versus(r: dict, u: dict | None, none: str) -> str:
    """'**beaten**: int3-g32 28.866 at 3.617' for mixed row r against uniform u (a _brief dict)."""
    if not u:
        return none
    verdict = "beaten" if r["perplexity"] < u["perplexity"] else "NOT beaten"
    return f"**{verdict}**: {u['label']} {u['perplexity']:.3f} at {u['bits_per_weight']:.3f}"


def _rechecked(r: dict, rival: str, rechecks: list[dict]) -> str:
    """'; re-runs: lower in 0 of 3' — the rechecks where both the mixed row r and its rival were re-run with the
    same threads, calibration draw and eval windows, compared on the most windows each pair was scored on; a
    verdict that does not hold there is not one. Sets r["rechecks_beaten"] = [wins, pairs]."""
    def key(c):
        return c["threads"], c["calib_seed"], c["eval_windows"]

    mine = {key(c): c for c in rechecks if c["label"] == r["label"]}
    pairs = [(mine[key(c)], c) for c in rechecks if c["label"] == rival and key(c) in mine]
    if not pairs:
        return ""
    wins = sum(m["perplexity"] < u["perplexity"] for m, u in pairs)
    r["rechecks_beaten"] = [wins, len(pairs)]
    return f"; re-runs: lower in {wins} of {len(pairs)}"


def compare(rows: list[dict], window: float = WINDOW) -> None:
    """Each mixed model vs the uniform schemes that cost the same or at most `window` bits per weight more
    (a wider window would pit a 3.5-bit budget against 4-bit schemes), and vs the uniform frontier
    interpolated at its size."""
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda u: u["bits_per_weight"])
    for r in (r for r in rows if r["kind"] == "mixed"):
        b = r["bits_per_weight"]
        band = [u for u in uni if b <= u["bits_per_weight"] <= b + window]
        best = min(band, key=lambda u: u["perplexity"], default=None)
        r["best_uniform_in_window"] = best and _brief(best)
        r["beats"] = bool(best) and r["perplexity"] < best["perplexity"]
        nxt = min((u for u in uni if u["bits_per_weight"] >= b), key=lambda u: u["bits_per_weight"], default=None)
        r["next_uniform"] = nxt and _brief(nxt)
        # frontier: the best uniform perplexity reachable at <= bpw, linearly interpolated between uniform points
        pts = [(u["bits_per_weight"], u["perplexity"]) for u in uni]
        lo = [p for p in pts if p[0] <= b]
        hi = [p for p in pts if p[0] >= b]
        if lo and hi:
            (x0, y0), (x1, y1) = max(lo, key=lambda p: p[0]), min(hi, key=lambda p: p[0])
            r["uniform_frontier_at_bpw"] = y0 if x1 == x0 else y0 + (y1 - y0) * (b - x0) / (x1 - x0)


def report(payload: dict, out: str) -> None:
    rows, probes, pr, fp_ppl = payload["rows"], payload["probes"], payload["protocol"], payload["fp_perplexity"]
    table = payload.get("table")
    for c in payload.get("rechecks", []):  # rechecks saved before --calib-seed / --eval-windows existed
        c.setdefault("calib_seed", 0)
        c.setdefault("eval_windows", table_eval_windows(payload))
        c.setdefault("perplexity_table_windows", c["perplexity"])
    for r in rows:  # uniform rows run separately (--add-uniform): their estimate from the saved table
        if r["kind"] == "uniform" and r.get("estimated_loss_increase") is None and table and r["label"] in table["schemes"]:
            r["estimated_loss_increase"] = sum(d[r["label"]] for d in table["damage"].values())
    compare(rows)
    est_rows = [r for r in rows if r.get("estimated_loss_increase") is not None]
    rho_models = spearman([r["estimated_loss_increase"] for r in est_rows], [math.log(r["perplexity"] / fp_ppl) for r in est_rows])
    payload["spearman_models"] = rho_models
    md = [f"# Mixed precision by measured sensitivity: {Path(pr['model']).name}", "", machine_line(payload["machine"]), "",
          f"Eval: {pr['eval']}. Calibration: {pr['calibration']}. Every model: {pr['method']}. fp perplexity "
          f"{fp_ppl:.3f}. Sensitivity cost: gradients {pr['sensitivity_seconds']['gradients']:.0f} s + "
          f"{len(pr['candidates'])} candidate schemes x {pr['linears']} linears "
          f"{pr['sensitivity_seconds']['table']:.0f} s (GPTQ per candidate), {payload['machine']['torch_threads']} "
          "torch thread(s); other jobs shared the 2 cores, so times are indicative.", "",
          "Estimate: " + ("G from the expected Fisher, next tokens drawn from the model" if pr.get("fisher") == "true"
                          else "G from the empirical Fisher, the data's next tokens") + " (llmq/sensitivity.py).", "",
          "Comparison: each mixed model against the cheapest uniform scheme that costs as much or more (the next one up "
          f"the size ladder), against the best uniform scheme that costs the same or up to {WINDOW} bits per weight "
          "more (the stricter test), and against the uniform frontier (the uniform perplexities linearly interpolated "
          "at the mixed model's size).", "",
          "| model | measured bits/w | perplexity | est. Δloss (nats) | next uniform up | best uniform at +0..0.25 bits "
          "| uniform frontier here |", "| --- | ---: | ---: | ---: | --- | --- | ---: |"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        cmp = front = nxt = "-"
        if r["kind"] == "mixed":
            nxt = _versus(r, r["next_uniform"], "none")
            cmp = _versus(r, r["best_uniform_in_window"], "none in the window")
            if r["best_uniform_in_window"]:
                cmp += _rechecked(r, r["best_uniform_in_window"]["label"], payload.get("rechecks", []))
            front = f"{r['uniform_frontier_at_bpw']:.3f}" if r.get("uniform_frontier_at_bpw") else "-"
        est = f"{r['estimated_loss_increase']:.4f}" if r.get("estimated_loss_increase") is not None else "-"
        label = f"**{r['label']}**" if r["kind"] == "mixed" else r["label"]
        md.append(f"| {label} | {r['bits_per_weight']:.4f} | {r['perplexity']:.3f} | {est} | {nxt} | {cmp} | {front} |")
    runs = {(r["run"]["git"], r["run"]["date"][:16]) for r in rows if r.get("run")}
    if runs:
        md += ["", "Rows marked in the JSON with a `run` come from an earlier or parallel run of this script with the same "
               "protocol (uniform models do not depend on the sensitivity estimate): "
               + "; ".join(f"git {g}, {dt}" for g, dt in sorted(runs)) + "."]  # fmt: skip
    if payload.get("rechecks"):
        tw = table_eval_windows(payload)
        md += ["", f"Float-order and calibration-draw check: rows re-run with another torch thread count (the table "
               f"used {payload['machine']['torch_threads']}) or another calibration draw (the table used seed 0), "
               f"scored on the table's {tw} eval windows and, where named, on more windows of the first half of the "
               "token stream (still disjoint from the calibration half). A mixed row keeps the table's allocation. "
               "GPTQ's result depends on the float summation order and on the calibration draw; a comparison "
               "closer than these differences is a tie.", "",
               (f"| model | bits/w | threads | calib seed | ppl, {tw} windows | eval windows | ppl, all those windows "
                "| in the table |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for c in payload["rechecks"]:
            more = f"{c['perplexity']:.3f}" if c["eval_windows"] != tw else "-"
            md.append(f"| {c['label']} | {c['bits_per_weight']:.4f} | {c['threads']} | {c['calib_seed']} | "
                      f"{c['perplexity_table_windows']:.3f} | {c['eval_windows']} | {more} | "
                      f"{c['table_perplexity']:.3f} |")  # fmt: skip
    md += ["", "Allocations (number of linears per scheme; for mixed-rows, output rows per scheme over all linears and "
           "how many linears are split):", ""]  # fmt: skip
    md += [f"- {r['label']}: " + ", ".join(f"{k} x{v}" for k, v in r["schemes"].items()) for r in rows
           if r["kind"] == "mixed" and "schemes" in r]  # fmt: skip
    md += [f"- {r['label']}: " + ", ".join(f"{k} {v} rows" for k, v in r["rows_per_scheme"].items())
           + f"; {r['split_linears']} of {pr['linears']} linears split" for r in rows if "rows_per_scheme" in r]
    md += ["", f"Does the estimate predict measured damage? {len(probes)} linears (every {pr['probe_every']}th) quantized "
           f"alone to {payload['probe_scheme']} (GPTQ), log-perplexity increase measured on the first "
           f"{pr['probe_windows']} eval windows: Spearman rank correlation with the estimated loss increase = "
           f"**{payload['spearman_probe']:.3f}**. Across the whole models above (uniform and mixed): Spearman(estimated, "
           f"measured log-perplexity increase) = **{rho_models:.3f}**.", "",
           "| linear (alone, " + payload["probe_scheme"] + ") | estimated Δloss | measured Δlog ppl |", "| --- | ---: | ---: |"]  # fmt: skip
    md += [f"| {p['linear']} | {p['estimated_loss_increase']:.5f} | {p['measured_log_ppl_increase']:.5f} |" for p in probes]
    md += ["", "![ppl vs bpw](mixed_ppl_vs_bpw.png)"]
    write_results(out, payload, "\n".join(md) + "\n")
    plot(rows, fp_ppl, pr["dataset"], re.search(r"first \d+ windows of 2048", pr["eval"]).group(0))


def plot(rows, fp_ppl, dataset, protocol: str):
    """The report command's ppl-vs-bpw plot, fed records in its own format."""
    from llmq.eval.report import plot_ppl_vs_bpw

    ds = {"name": "wikitext2", "split": "test", **dataset}
    recs = [{"label": "fp", "kind": "fp", "perplexity": fp_ppl, "dataset": ds}]
    recs += [{"label": r["label"], "kind": "llmq", "method": "mixed" if r["kind"] == "mixed" else "gptq",
              "perplexity": r["perplexity"], "bits_per_weight": r["bits_per_weight"], "dataset": ds} for r in rows]  # fmt: skip
    plot_ppl_vs_bpw([r for r in recs if r["perplexity"] < 4 * fp_ppl or r["kind"] == "fp"], RESULTS / "mixed_ppl_vs_bpw.png",
                    title=protocol)


if __name__ == "__main__":
    sys.exit(main())
