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
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, default_model, machine, machine_line, write_results  # noqa: E402

from llmq import sources  # noqa: E402
from llmq.allocate import allocate, plan_for  # noqa: E402
from llmq.archs import arch_for, weight_of  # noqa: E402
from llmq.calibration import draw_windows, tokenize_text  # noqa: E402
from llmq.config import DEFAULT_CANDIDATES, CalibConfig, GPTQConfig, QuantPlan, scheme_from_name  # noqa: E402
from llmq.data import load_text  # noqa: E402
from llmq.eval.perplexity import perplexity, text_sha256  # noqa: E402
from llmq.modeling import fake_quantize  # noqa: E402
from llmq.pipeline import quantize  # noqa: E402
from llmq.sensitivity import layer_stats, quantize_candidate, sensitivity_table  # noqa: E402

UNIFORM = ("int3-pc", "int3-g128", "int3-g64", "int4-pc", "int4-g128", "nf4-g64", "int4-g64", "nf4-g32", "int4-g32")
PROBE = "int2-g64"


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
    a = ap.parse_args()
    m = machine()

    src = sources.resolve(a.model or default_model())
    fp_model, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    text, where = load_text(None, "test")
    tokens = tokenize_text(tok, text)
    calib = draw_windows(tokens, CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, split="test", token_range=(0.5, 1.0)))
    eval_tokens = tokens[: a.eval_windows * 2048]
    assert len(eval_tokens) <= len(tokens) // 2
    gcfg = GPTQConfig()
    spec = arch_for(fp_model.config)

    def ppl(model) -> float:
        return perplexity(model, eval_tokens, 2048)["perplexity"]

    fp_ppl = ppl(fp_model)
    print(f"fp {fp_ppl:.3f}", flush=True)

    # 1. sensitivity
    t0 = time.perf_counter()
    stats = layer_stats(fp_model, calib, quiet=False)
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

    def run(label, plan, kind, extra=None):
        model = copy.deepcopy(fp_model)
        t = time.perf_counter()
        qw = quantize(model, plan, calib, method="gptq", gptq=gcfg)
        secs = time.perf_counter() - t
        fake_quantize(model, qw)
        bpw = 8 * sum(q.nbytes() for q in qw.values()) / sum(q.shape[0] * q.shape[1] for q in qw.values())
        row = {"label": label, "kind": kind, "perplexity": ppl(model), "bits_per_weight": bpw,
               "quant_seconds": round(secs, 1), **(extra or {})}  # fmt: skip
        print(f"{label}: ppl {row['perplexity']:.3f} at {bpw:.4f} bpw", flush=True)
        return row

    rows = []
    for target in a.targets:
        al = allocate(table.damage, table.nbytes, table.weights, target)
        counts = {}
        for s in al.choice.values():
            counts[s] = counts.get(s, 0) + 1
        rows.append(run(f"mixed {target:g}", plan_for(al, table.schemes), "mixed",
                        {"target_bpw": target, "estimated_loss_increase": al.damage, "allocation_bpw": al.bits_per_weight,
                         "schemes": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "choice": al.choice}))  # fmt: skip
    for name in a.uniform:
        s = scheme_from_name(name, clip_search=True)
        est = sum(table.damage[n][name] for n in table.damage) if name in cands else None
        rows.append(run(name, QuantPlan(s), "uniform", {"estimated_loss_increase": est}))

    # comparison: each mixed model vs the uniform schemes of the same or higher measured bpw
    uni = [r for r in rows if r["kind"] == "uniform"]
    for r in rows:
        if r["kind"] != "mixed":
            continue
        above = [u for u in uni if u["bits_per_weight"] >= r["bits_per_weight"]]
        nearest = min(above, key=lambda u: u["bits_per_weight"]) if above else None
        best_within = min((u for u in above if u["bits_per_weight"] <= r["bits_per_weight"] + 0.25),
                          key=lambda u: u["perplexity"], default=nearest)  # fmt: skip
        r["nearest_uniform_above"] = nearest and {k: nearest[k] for k in ("label", "perplexity", "bits_per_weight")}
        r["best_uniform_within_0.25"] = best_within and {k: best_within[k] for k in ("label", "perplexity", "bits_per_weight")}
        r["beats"] = bool(best_within) and r["perplexity"] < best_within["perplexity"]

    protocol = {"eval": f"WikiText-2 test ({where}, sha256 {text_sha256(text)[:16]}), first {a.eval_windows} windows "
                        f"of 2048 = {len(eval_tokens):,} tokens, no BOS",
                "calibration": f"{a.nsamples} x {a.seqlen} tokens, seed 0, from the second half of the token stream",
                "method": "GPTQ, act-order + static groups + clip search, damp 0.01", "candidates": list(DEFAULT_CANDIDATES),
                "sensitivity_seconds": {"gradients": round(t_stats, 1), "table": round(table.seconds, 1)}}  # fmt: skip
    payload = {"machine": m, "protocol": protocol, "fp_perplexity": fp_ppl, "probe_scheme": PROBE, "probes": probes,
               "spearman_probe": rho, "rows": rows}  # fmt: skip
    md = [f"# Mixed precision by measured sensitivity: {Path(str(src)).name}", "", machine_line(m), "",
          f"Eval: {protocol['eval']}. Calibration: {protocol['calibration']}. Every model: {protocol['method']}. "
          f"fp perplexity {fp_ppl:.3f}. Sensitivity cost: gradients {t_stats:.0f} s + {len(cands)} candidate "
          f"schemes x {len(table.damage)} linears {table.seconds:.0f} s (GPTQ per candidate).", "",
          "| model | measured bits/w | perplexity | est. Δloss | beats best uniform at ≥ its bits (within +0.25) |",
          "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        cmp = "-"
        if r["kind"] == "mixed":
            b = r["best_uniform_within_0.25"]
            cmp = f"{'yes' if r['beats'] else 'NO'} vs {b['label']} ({b['perplexity']:.3f} at {b['bits_per_weight']:.3f})" if b else "no uniform above"
        est = f"{r['estimated_loss_increase']:.4f}" if r.get("estimated_loss_increase") is not None else "-"
        md.append(f"| {r['label']} | {r['bits_per_weight']:.4f} | {r['perplexity']:.3f} | {est} | {cmp} |")
    md += ["", "Allocations (number of linears per scheme):", ""]
    md += [f"- {r['label']}: " + ", ".join(f"{k} x{v}" for k, v in r["schemes"].items()) for r in rows if r["kind"] == "mixed"]
    md += ["", f"Does the estimate predict measured damage? {len(probes)} linears (every {step}th) quantized alone to {PROBE} "
           f"(GPTQ), log-perplexity increase measured on the first {a.probe_windows} eval windows: "
           f"Spearman rank correlation between estimated loss increase and measured log-perplexity increase = "
           f"**{rho:.3f}**. Across the mixed and uniform models: Spearman(estimated, measured log ppl increase) = "
           f"**{spearman([r['estimated_loss_increase'] for r in rows if r.get('estimated_loss_increase') is not None], [math.log(r['perplexity'] / fp_ppl) for r in rows if r.get('estimated_loss_increase') is not None]):.3f}**.",
           "", "![ppl vs bpw](mixed_ppl_vs_bpw.png)"]  # fmt: skip
    write_results(a.out, payload, "\n".join(md) + "\n")
    plot(rows, fp_ppl, text, len(tokens), len(eval_tokens))
    return 0


def plot(rows, fp_ppl, text, n_tokens, n_eval):
    """The report command's ppl-vs-bpw plot, fed records in its own format."""
    from llmq.eval.report import plot_ppl_vs_bpw

    ds = {"name": "wikitext2", "split": "test", "sha256": text_sha256(text), "tokens": n_tokens}
    recs = [{"label": "fp", "kind": "fp", "perplexity": fp_ppl, "dataset": ds}]
    recs += [{"label": r["label"], "kind": "llmq", "method": "mixed" if r["kind"] == "mixed" else "gptq",
              "perplexity": r["perplexity"], "bits_per_weight": r["bits_per_weight"], "dataset": ds} for r in rows]  # fmt: skip
    plot_ppl_vs_bpw([r for r in recs if r["perplexity"] < 4 * fp_ppl or r["kind"] == "fp"], RESULTS / "mixed_ppl_vs_bpw.png")


if __name__ == "__main__":
    sys.exit(main())
