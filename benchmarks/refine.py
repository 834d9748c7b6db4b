"""Learned rounding after GPTQ (`llmq quantize --method gptq --refine`) against the default GPTQ run, on SmolLM2.

    python benchmarks/refine.py run [--model GGUF] [--schemes int3-g128 int4-g128 ...] [--draws 0 1]
                                    [--refine STEPS] [--refined-only] [--jobs 2] [--work /tmp/llmq-refine]
    python benchmarks/refine.py layer8b [--work ...]                # one Llama-3-8B-shaped layer: cost per step
    python benchmarks/refine.py cost [--layers 6] [--work ...]      # the time bound, alone on the machine
    python benchmarks/refine.py state [--label REV] [--work ...]    # one linear's step time and state memory
    python benchmarks/refine.py report [--work ...]                 # results/refine.{json,md}

Protocol: WikiText-2 test; calibration `--nsamples` x `--seqlen` (default 32 x 2048) drawn with seed = draw from the
second half of the token stream (`--calib-range 0.5:1`); perplexity `llmq eval --max-windows 10` (the first 10
windows of 2048, in the first half: disjoint from calibration). Every run is `llmq quantize` (streaming, as a user
runs it) then `llmq eval`, each a process of its own. `--jobs 2` runs GPTQ and GPTQ + refinement of the same scheme
and draw side by side, one torch thread each, so their times are measured under the same load; the peak RSS is
each `llmq quantize` process's own (summary.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402

from llmq.config import REFINE_STEPS  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
EVAL_WINDOWS = 10
# int3 g128 runs with other refinement settings (the work directory's TAG.eval.json), for the report's table
VARIANTS = [(tag, dict(zip(("draw", "target", "loss", "lr", "tokens"), v))) for tag, v in {
    "int3-g128-d0-prev": (0, "quantized", "window", 0.005, "1 x 512"),
    "int3-g128-d1-prev": (1, "quantized", "window", 0.005, "1 x 512"),
    "int3-g128-d0-prev-fp": (0, "fp", "window", 0.005, "1 x 512"),
    "int3-d0-tokq": (0, "quantized", "token", 0.005, "1 x 512"),
    "int3-d0-tokfp": (0, "fp", "token", 0.005, "1 x 512"),
    "int3-d0-tokfp-b2s256": (0, "fp", "token", 0.005, "2 x 256"),
    "int3-d0-tokfp-lr02": (0, "fp", "token", 0.02, "1 x 512"),
    "int3-g128-d0-refine50-ce9ee88": (0, "fp", "token", 0.01, "1 x 512"),
    "int3-g128-d1-refine50-ce9ee88": (1, "fp", "token", 0.01, "1 x 512"),
}.items()]
SCHEMES = {  # name -> llmq quantize flags
    "int3-g128": ["--bits", "3", "--group-size", "128"],
    "int4-g128": ["--bits", "4", "--group-size", "128"],
    "int2-g64": ["--bits", "2", "--group-size", "64"],
    "nf3-g64": ["--format", "nf3", "--group-size", "64"],
    "nf4-g64": ["--format", "nf4", "--group-size", "64"],
}


def sh(cmd: list, log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({log}):\n{(r.stdout + r.stderr)[-3000:]}")
    return time.perf_counter() - t0


def evaluate(model, out: Path, threads: int) -> float:
    if not out.exists():
        sh([sys.executable, "-m", "llmq", "eval", model, "--max-windows", EVAL_WINDOWS, "--json", out, "--quiet"],
           out.with_suffix(".log"), threads)  # fmt: skip
    return json.loads(out.read_text())["perplexity"]


def one(a, scheme: str, draw: int, refine: int, threads: int) -> dict:
    T = a.refine_seqlen if refine else None
    tag = f"{scheme}-d{draw}-" + (f"refine{refine}" + (f"-t{T}" if T != 512 else "") if refine else "gptq")
    q = Path(a.work) / tag
    row = {"scheme": scheme, "draw": draw, "refine": refine, "refine_seqlen": T, "tag": tag}
    if not (q / "summary.json").exists() or not (q / "config.json").exists():
        calib = ["--calib", WIKI, "--calib-split", "test", "--calib-range", "0.5:1", "--nsamples", a.nsamples,
                 "--seqlen", a.seqlen, "--seed", draw]  # fmt: skip
        flags = SCHEMES[scheme] + ["--refine", refine]  # 0: GPTQ alone (at <= 3 bits it refines by default)
        flags += ["--refine-seqlen", T] if refine else []
        sh([sys.executable, "-m", "llmq", "quantize", a.model, q, "--method", "gptq", *calib, *flags, "--overwrite",
            "--quiet"], q.with_suffix(".quantize.log"), threads)  # fmt: skip
    s = json.loads((q / "summary.json").read_text())
    row |= {"bits_per_weight": s["bits_per_weight"], "quantize_time_s": s["quantize_time_s"],
            "total_time_s": s["total_time_s"], "peak_rss_mb": s["peak_rss_mb"], "phases_s": s["phases_s"]}
    if refine:
        ls = [r["refine"] for r in s["layers"]]
        row["refine_layers"] = [{k: r[k] for k in ("loss_before", "loss_after", "kept", "seconds")} for r in ls]
    row["perplexity"] = evaluate(q, Path(a.work) / f"{tag}.eval.json", threads)
    print(json.dumps({k: v for k, v in row.items() if k != "refine_layers"}), flush=True)
    return row


def run(a) -> None:
    Path(a.work).mkdir(parents=True, exist_ok=True)
    threads = 1 if a.jobs > 1 else a.threads
    fp = evaluate(a.model, Path(a.work) / "fp.eval.json", 2)
    print("fp perplexity", fp, flush=True)
    runs = (a.refine,) if a.refined_only else dict.fromkeys((0, a.refine))  # --refined-only: GPTQ's rows kept
    pairs = [(s, d, r) for s in a.schemes for d in a.draws for r in runs]
    with ThreadPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(lambda p: one(a, *p, threads), pairs))
    prev = json.loads((Path(a.work) / "rows.json").read_text()) if (Path(a.work) / "rows.json").exists() else []
    keep = [r for r in prev if r["tag"] not in {x["tag"] for x in rows}]
    (Path(a.work) / "rows.json").write_text(json.dumps(keep + rows, indent=1))
    (Path(a.work) / "setup.json").write_text(json.dumps({"fp_perplexity": fp, "model": str(a.model),
                                                         "nsamples": a.nsamples, "seqlen": a.seqlen,
                                                         "machine": machine() | {"torch_threads": threads}}))


def layer8b(a) -> None:
    """One random-init decoder layer of Llama-3-8B's shape (benchmarks/scale.py's), GPTQ int4 g128 with `--refine 4`
    (4 x 512 calibration tokens, one thread): the refinement's seconds per step, its phase beside GPTQ's, peak RSS at
    real size, for the projection in docs/SCALE.md."""
    from scale import Shape, generate

    w = Path(a.work)
    model = generate(w / "llama3-8b-1layer", Shape("Llama-3-8B (1 layer)", 4096, 14336, 1, 32, 8, 49152))
    res = {}
    for refine in (4,):
        out = w / f"llama3-8b-refine{refine}"
        if not (out / "summary.json").exists():
            sh([sys.executable, "-m", "llmq", "quantize", model, out, "--method", "gptq", "--calib", WIKI,
                "--calib-split", "test", "--nsamples", 4, "--seqlen", 512, "--bits", 4, "--group-size", 128,
                *(["--refine", refine] if refine else []), "--overwrite", "--quiet"], out.with_suffix(".log"), 1)
        s = json.loads((out / "summary.json").read_text())
        res[f"refine{refine}"] = {"phases_s": s["phases_s"], "peak_rss_mb": s["peak_rss_mb"],
                                  "layer_s": s["layers"][0]["seconds"], "refine": s["layers"][0].get("refine")}
    res["machine"] = machine()
    (w / "layer8b.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def state(a) -> None:
    """The refinement's state and step cost per linear, in this process alone (`--threads`, default 1): a 1536 x 576
    and a 576 x 1536 weight (SmolLM2's MLP), int3 g128 with act-order: the fake quantization's forward + backward
    (median of 20); one 4096 x 4096 int3 g128 weight (an 8B attention projection, round to nearest), three signed
    steps on 64 tokens: the process's peak RSS above its RSS before the refinement's state was built. `--label`
    names the revision (PYTHONPATH=<an older checkout> measures that one; results/refine.md shows every label)."""
    import resource
    import statistics

    import psutil
    import torch

    from llmq.algorithms.gptq import gptq
    from llmq.algorithms.refine import Rounding
    from llmq.algorithms.rtn import rtn
    from llmq.config import GPTQConfig, QuantScheme

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    scheme, res = QuantScheme(bits=3, group_size=128), {"threads": a.threads}
    for R, C in ((1536, 576), (576, 1536)):
        W, X = torch.randn(R, C), torch.randn(C, 2048)
        r = Rounding(W, gptq(W, X @ X.T / 2048, scheme, GPTQConfig(act_order=True, static_groups=True)))
        g, ts = torch.randn(R, C), []
        for k in range(23):
            t0 = time.perf_counter()
            r.weight().backward(g)
            ts.append(time.perf_counter() - t0)
        res[f"fake_quant_ms_{R}x{C}"] = round(statistics.median(ts[3:]) * 1000, 2)
    W, X = torch.randn(4096, 4096), torch.randn(64, 4096)
    q = rtn(W, scheme)  # the state does not depend on which codes
    base = psutil.Process().memory_info().rss
    r = Rounding(W, q)
    for _ in range(3):
        (X @ r.weight().t()).square().mean().backward()
        with torch.no_grad():
            for p in r.params():
                p.add_(torch.sign(p.grad), alpha=-0.01)
                p.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["state_peak_mb_4096x4096"] = round((peak - base) / 2**20)
    res["state_bytes_per_weight"] = round((peak - base) / W.numel(), 1)
    res["machine"] = machine()
    f = Path(a.work) / "state.json"
    prev = json.loads(f.read_text()) if f.exists() else {}
    f.write_text(json.dumps(prev | {a.label: res}, indent=1))
    print(json.dumps({a.label: res}))


def cost(a) -> None:
    """The time bound, GPTQ and GPTQ + refinement measured one after the other under the same load (`--threads`,
    default 1): GPTQ int3 g128 and GPTQ + refinement of SmolLM2's
    first `--layers` decoder layers in memory (`pipeline.quantize`, the conversion's layer loop), 32 x 2048 calibration
    tokens of draw 0; the seconds of each layer (calibration capture excluded, the same for both)."""
    import copy

    import torch

    from common import real_setup
    from llmq.config import GPTQConfig, QuantScheme
    from llmq.pipeline import quantize

    torch.set_num_threads(a.threads)
    S = real_setup(a.model, a.nsamples, a.seqlen, EVAL_WINDOWS, seed=0)
    m0 = S.fp_model
    m0.model.layers = m0.model.layers[: a.layers]
    m0.config.num_hidden_layers = a.layers
    res = {}
    for steps in (0, a.refine):
        reps: list = []
        quantize(copy.deepcopy(m0), QuantScheme(bits=3, group_size=128, clip_search=True), S.calib, method="gptq",
                 gptq=GPTQConfig(refine=steps), reports=reps)  # fmt: skip
        res[f"refine{steps}"] = {"layer_s": [round(r.seconds, 2) for r in reps],
                                 "total_s": sum(r.seconds for r in reps), "phases": [r.phases for r in reps]}
        print(steps, res[f"refine{steps}"]["total_s"], flush=True)
    res["layers"], res["threads"], res["machine"] = a.layers, a.threads, machine()
    (Path(a.work) / "cost.json").write_text(json.dumps(res, indent=1))


def _run(row: dict) -> tuple[int, int]:
    """(steps, tokens per prefix) of a row (rows of before --refine-seqlen was recorded: 512)."""
    return row["refine"], (row.get("refine_seqlen") or 512) if row["refine"] else 0


def geo(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def report(a) -> None:
    w = Path(a.work)
    rows = json.loads((w / "rows.json").read_text())
    setup = json.loads((w / "setup.json").read_text())
    fp = setup["fp_perplexity"]
    m = setup["machine"]
    lines = ["# Learned rounding after GPTQ (`--refine`), SmolLM2-135M-Instruct", "", machine_line(m), "",
             f"Protocol: WikiText-2 test; calibration {setup['nsamples']} x {setup['seqlen']} tokens (seed = draw) "
             f"from the second half of the token stream; perplexity `llmq eval` on the first {EVAL_WINDOWS} windows "
             f"of 2048 (the first half). fp perplexity **{fp:.3f}**. Each run `llmq quantize --method gptq` "
             "(default recipe: act-order, static groups, clip search, true sequential), with or without `--refine "
             "STEPS` (its defaults: the fp model's own layer outputs as target, per-token loss, lr 0.01, 512-token "
             "prefixes), then `llmq eval`, each its own process with one torch thread (benchmarks/refine.py). Other "
             "jobs shared the two cores at times (the other runs, up to four at once, and tests), so the `quantize s` "
             "and `refine s` columns are not comparable between rows; the time bound is measured alone below. "
             "Increase = perplexity − fp; ratio = the refined "
             "run's increase / GPTQ's (geometric mean over draws); loss = the refinement's loss (each token's relative "
             "squared error against the fp model's output of the layer, which includes what the layers before left), "
             "averaged over the layers, before → after (summary.json). Rows kept from results/refine.json of "
             "ce9ee88 (the int2/int3/int4 GPTQ rows, the rows marked so, the variants below) were measured there, "
             "on an AMD EPYC machine of 2 cores with transformers 5.24.0; the others on the machine "
             "above.", ""]  # fmt: skip
    lines += ["| scheme | run | bits/w | ppl per draw | ppl (geo. mean) | increase | ratio | quantize s | refine s | "
              "peak RSS MB | layer loss before → after |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    summary = {}
    for scheme in [s for s in SCHEMES if any(r["scheme"] == s for r in rows)]:
        base = None
        for refine, T in sorted({_run(r) for r in rows if r["scheme"] == scheme}):
            rs = sorted((r for r in rows if r["scheme"] == scheme and _run(r) == (refine, T)), key=lambda r: r["draw"])
            ppl = geo([r["perplexity"] for r in rs])
            inc = ppl - fp
            if refine == 0:
                base = inc
            ratio = inc / base if base and refine else None
            t = sum(r["quantize_time_s"] for r in rs) / len(rs)
            tr = sum(r["phases_s"].get("refine", 0.0) for r in rs) / len(rs)
            rss = max(r["peak_rss_mb"] for r in rs)
            loss = ""
            if refine:
                b = [x["loss_before"] for r in rs for x in r["refine_layers"]]
                f = [x["loss_after"] if x["kept"] else x["loss_before"] for r in rs for x in r["refine_layers"]]
                loss = f"{sum(b) / len(b):.4f} → {sum(f) / len(f):.4f}"
            name = (f"GPTQ + refine {refine} x {T}" if refine else "GPTQ (`--refine 0`)")
            if refine and all("refine_seqlen" not in r for r in rs):  # rows kept from results/refine.json
                name += " (at ce9ee88)"
            per = " / ".join(f"{r['perplexity']:.3f}" for r in rs)
            rt = "" if ratio is None else f"{ratio:.2f}"
            lines.append(f"| {scheme} | {name} | {rs[0]['bits_per_weight']:.3f} | {per} | {ppl:.3f} | {inc:+.3f} | "
                         f"{rt} | {t:.0f} | {tr:.0f} | {rss:.0f} | {loss} |")  # fmt: skip
            summary[f"{scheme} {name}"] = {"perplexity": ppl, "increase": inc, "ratio": ratio, "quantize_time_s": t,
                                           "refine_time_s": tr, "peak_rss_mb": rss}  # fmt: skip
    lines.append("")
    var = [(t, d, json.loads((w / f"{t}.eval.json").read_text())["perplexity"]) for t, d in VARIANTS
           if (w / f"{t}.eval.json").exists()]  # fmt: skip
    if var:
        g = {r["draw"]: r["perplexity"] for r in rows if r["scheme"] == "int3-g128" and r["refine"] == 0}
        lines += ["## What was tried: int3 g128, 50 steps", "",
                  "`llmq quantize --method gptq --bits 3 --group-size 128 --refine 50` with the protocol above and "
                  "the settings of each row (target: `--refine-target`; loss: the relative squared error over the "
                  "whole window, as the code had it at 0b50fb4, or per token averaged (llmq/pipeline/refine.py "
                  "`_loss`: the first token of a window carries the massive activations, 98% of the squared norm of "
                  "a 512-token prefix at layer 15); lr: `--refine-lr`; windows per step x `--refine-seqlen`). "
                  "The window-wide and per-token rows with other settings were run with that revision or a "
                  "temporary switch; the last setting is the default now. Every row of this table was measured at "
                  "ce9ee88 or before; the main table above has this revision's runs of the default (the fake "
                  "quantization has been restructured since: the same arithmetic, but the signed steps are chaotic, "
                  "so the trajectory differs).", "",
                  "| draw | target | loss | lr | tokens per step | perplexity | increase / GPTQ's |",
                  "| ---: | --- | --- | ---: | --- | ---: | ---: |"]  # fmt: skip
        for t, d, ppl in var:
            ratio = (ppl - fp) / (g[d["draw"]] - fp) if d["draw"] in g else float("nan")
            lines.append(f"| {d['draw']} | {d['target']} | {d['loss']} | {d['lr']} | {d['tokens']} | {ppl:.3f} | "
                         f"{ratio:.2f} |")  # fmt: skip
        prev4 = w / "int4-g128-d0-prev.eval.json"
        if prev4.exists():
            lines += ["", "int4 g128, draw 0, with the first settings (quantized target, window loss, lr 0.005): "
                      f"{json.loads(prev4.read_text())['perplexity']:.3f}."]  # fmt: skip
        lines.append("")
    c = json.loads((w / "cost.json").read_text()) if (w / "cost.json").exists() else None
    if c:
        g, r = c["refine0"], next(v for k, v in c.items() if k.startswith("refine") and k != "refine0")
        steps = next(k for k in c if k.startswith("refine") and k != "refine0")[6:]
        lines += ["## Time, one after the other under the same load", "",
                  f"`python benchmarks/refine.py cost`: SmolLM2's first {c['layers']} decoder layers quantized in "
                  f"memory by the conversion's layer loop, int3 g128, 32 x 2048 calibration tokens, {c['threads']} "
                  "thread(s), the other core running one other single-threaded job throughout (an `llmq quantize` "
                  "of int4 g128 with refinement at this revision; of NF4 before) "
                  f"({c['machine']['date']}): GPTQ {g['total_s']:.1f} s, GPTQ + refine {steps} "
                  f"{r['total_s']:.1f} s: **{r['total_s'] / g['total_s']:.2f}x** (per layer: "
                  f"{' / '.join(f'{x:.0f}' for x in g['layer_s'])} s against "
                  f"{' / '.join(f'{x:.0f}' for x in r['layer_s'])} s). Every layer costs about the same, so the whole "
                  "model's ratio is this one's.", ""]  # fmt: skip
    st = json.loads((w / "state.json").read_text()) if (w / "state.json").exists() else None
    if st:
        lines += ["## One linear's step and state", "",
                  "`python benchmarks/refine.py state` (each revision in a process of its own, one thread, the other "
                  "core running one single-threaded `llmq quantize`): the fake quantization's forward + backward "
                  "of one weight, int3 g128 with act-order "
                  "(median of 20); the peak RSS of three signed steps on one 4096 x 4096 int3 g128 weight (64 "
                  "tokens) above the RSS before its state was built (the step's fake-quantized weight and its "
                  "gradient included).", "",
                  "| revision | 1536 x 576 ms | 576 x 1536 ms | 4096 x 4096 peak MB | bytes per weight | date |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        for label, r in st.items():
            lines.append(f"| {label} | {r['fake_quant_ms_1536x576']} | {r['fake_quant_ms_576x1536']} | "
                         f"{r['state_peak_mb_4096x4096']} | {r['state_bytes_per_weight']} | {r['machine']['date']} |")
        lines.append("")
    big = json.loads((w / "layer8b.json").read_text()) if (w / "layer8b.json").exists() else None
    if big:
        r4 = big["refine4"]
        f, ph = r4["refine"], r4["phases_s"]
        gptq_s = sum(v for k, v in ph.items() if k not in ("refine", "read", "write"))
        lines += ["## One Llama-3-8B-shaped layer", "",
                  "`python benchmarks/refine.py layer8b`: one random-init decoder layer of Llama-3-8B's shape (4096 / "
                  "14336, GQA 32/8), GPTQ int4 g128 on 4 x 512 calibration tokens, one thread, `--refine 4`: "
                  f"{f['step_seconds'] / f['steps']:.1f} s per refinement step (one 512-token window: forward + "
                  f"backward + fake quantization of 218M weights), {f['seconds']:.0f} s for the whole refinement "
                  f"(targets and the two scores of 4 windows included) beside {gptq_s:.0f} s for the rest of the "
                  f"layer's GPTQ; peak RSS {r4['peak_rss_mb']:.0f} MB ({big.get('machine', {}).get('date', '')}; at "
                  "ce9ee88, on the AMD machine, with every window scored and 27 bytes of state per weight: 22.9 s "
                  "per step, 160 s, 10622 MB). Four steps on a random layer measure the cost, not the quality (the "
                  f"refinement was {'kept' if f['kept'] else 'not kept: its loss rose'}). The projection for a GPU "
                  "is in docs/SCALE.md.", ""]  # fmt: skip
    variants = [{"tag": t, **d, "perplexity": ppl} for t, d, ppl in var]
    write_results("refine", {"setup": setup, "rows": rows, "summary": summary, "variants": variants, "cost": c,
                             "state": st, "layer8b": big},
                  "\n".join(lines) + "\n")  # fmt: skip
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["run", "layer8b", "cost", "state", "report"])
    p.add_argument("--label", default="now", help="state: the revision measured")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--schemes", nargs="+", default=["int3-g128", "int4-g128"], choices=list(SCHEMES))
    p.add_argument("--draws", nargs="+", type=int, default=[0, 1])
    p.add_argument("--refine", type=int, default=REFINE_STEPS)
    p.add_argument("--refine-seqlen", type=int, default=512, help="run: --refine-seqlen of the refined runs")
    p.add_argument("--refined-only", action="store_true", help="run: only the refined runs (GPTQ's in rows.json)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="/tmp/llmq-refine")
    a = p.parse_args()
    a.model = a.model or default_model()
    {"run": run, "layer8b": layer8b, "cost": cost, "state": state, "report": report}[a.step](a)


if __name__ == "__main__":
    main()
