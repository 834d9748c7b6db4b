"""Rotations fused before quantization (--rotate) vs none, RTN and GPTQ, 2-4 bits, on the real model.

    python benchmarks/rotation.py [--model PATH] [--nsamples 16] [--seqlen 512] [--eval-windows 4] [--draws 0 1]
                                  [--jobs 2] [--only SUBSTR ...] [--out rotation]

Protocol (the quality table's, benchmarks/quality.py, smaller): WikiText-2 test, rows joined with "\\n\\n",
tokenized once without BOS; perplexity on the first `eval-windows` non-overlapping windows of 2048 tokens
(llmq.eval.perplexity); calibration `nsamples` x `seqlen` tokens drawn with seed = draw from the second half of the
same stream (disjoint from the evaluation). Each config runs on a copy of the fp32 model: rotated in place
(llmq.rotate_model, seed 0) or not, quantized (RTN: plain round-to-nearest, the CLI's RTN default; GPTQ: the CLI's
default recipe, act-order + static groups + true-sequential quantized-input Hessians + clip search), fake-quantized
(dequantized weights, other tensors through fp16) and scored. RTN needs no calibration: one draw. `--jobs` processes
of one thread each share the configs (perplexity does not depend on timing; the quantization seconds are then taken
two at a time on 2 cores). The rotated full-precision model is scored too: it must equal the original.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402

S = dict
SCHEMES = {  # name -> QuantScheme kwargs
    "int2-g64": S(bits=2, group_size=64),
    "int3-g128": S(bits=3, group_size=128),
    "int3-g64-dq": S(bits=3, group_size=64, double_quant=True),
    "nf3-g64": S(format="nf3", group_size=64),
    "int4-g128": S(bits=4, group_size=128),
    "nf4-g64": S(format="nf4", group_size=64),
}
ROTATIONS = ("none", "hadamard")


def configs(draws: list[int]) -> list[dict]:
    out = [{"name": f"fp {rot}", "method": "fp", "rotate": rot} for rot in ("none", "hadamard", "random")]
    for scheme in SCHEMES:
        for rot in ROTATIONS:
            out.append({"name": f"rtn {scheme} {rot}", "method": "rtn", "scheme": scheme, "rotate": rot, "draw": None})
            for d in draws:
                out.append({"name": f"gptq {scheme} {rot} d{d}", "method": "gptq", "scheme": scheme, "rotate": rot,
                            "draw": d})  # fmt: skip
    for d in draws:  # a random orthogonal matrix instead of a Hadamard one, where it matters most
        out.append({"name": f"gptq int3-g128 random d{d}", "method": "gptq", "scheme": "int3-g128", "rotate": "random",
                    "draw": d})  # fmt: skip
    return out


def run(cfgs: list[dict], a) -> list[dict]:
    """Run `cfgs` in this process: one fp32 model, a copy per config."""
    from llmq import rotate_model, sources
    from llmq.calibration import draw_windows, tokenize_text
    from llmq.config import CalibConfig, GPTQConfig, QuantScheme
    from llmq.data import load_text
    from llmq.eval.perplexity import perplexity
    from llmq.modeling import fake_quantize
    from llmq.pipeline import quantize

    src = sources.resolve(a.model or default_model())
    fp_model, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    text, _ = load_text(None, "test")
    tokens = tokenize_text(tok, text)
    eval_tokens = tokens[: a.eval_windows * 2048]
    rows = []
    for c in cfgs:
        model = copy.deepcopy(fp_model)
        t0 = time.perf_counter()
        if c["rotate"] != "none":
            rotate_model(model, c["rotate"], seed=0)
        t_rot = time.perf_counter() - t0
        row = dict(c, rotate_seconds=round(t_rot, 2))
        if c["method"] != "fp":
            scheme = QuantScheme(**SCHEMES[c["scheme"]], clip_search=c["method"] == "gptq")
            calib = None
            if c["method"] == "gptq":
                calib = draw_windows(tokens, CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, seed=c["draw"],
                                                         split="test", token_range=(0.5, 1.0)))  # fmt: skip
            t0 = time.perf_counter()
            qw = quantize(model, scheme, calib, method=c["method"], gptq=GPTQConfig() if calib is not None else None)
            row["quant_seconds"] = round(time.perf_counter() - t0, 1)
            fake_quantize(model, qw)
            row["bits_per_weight"] = 8 * sum(q.nbytes() for q in qw.values()) / sum(q.shape[0] * q.shape[1]
                                                                                   for q in qw.values())  # fmt: skip
            del qw
        row["perplexity"] = perplexity(model, eval_tokens, 2048)["perplexity"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    return rows


def table(rows: list[dict], a, m) -> str:
    fp = next(r["perplexity"] for r in rows if r["name"] == "fp none")
    by = {r["name"]: r for r in rows}

    def mean(names):
        v = [by[n]["perplexity"] for n in names if n in by]
        return sum(v) / len(v) if v else None

    md = [f"# Rotations fused before quantization on {Path(str(a.model or default_model())).name}", "",
          machine_line(m), "", "Protocol " + __doc__.split("Protocol ")[1].split("\n\n")[0].strip().replace("\n", " "), "",
          f"Full precision: {fp:.4f}; rotated (Hadamard) {by['fp hadamard']['perplexity']:.4f}, rotated (random) "
          f"{by['fp random']['perplexity']:.4f}: the fused model is the same model.", "",
          "Perplexity and its increase over full precision (GPTQ: the mean of the calibration draws, each draw in "
          "brackets); 'excess ratio' = rotated increase / unrotated increase (< 1: rotation helps; acceptance at int3 "
          "g128 GPTQ: <= 0.5).", "",
          "| scheme | method | no rotation | Δ | Hadamard | Δ | excess ratio |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    summary = {}
    for scheme in SCHEMES:
        for method in ("rtn", "gptq"):
            cells = {}
            for rot in ROTATIONS:
                names = [f"rtn {scheme} {rot}"] if method == "rtn" else [f"gptq {scheme} {rot} d{d}" for d in a.draws]
                p = mean(names)
                each = "" if method == "rtn" else " (" + ", ".join(f"{by[n]['perplexity']:.2f}" for n in names
                                                                     if n in by) + ")"  # fmt: skip
                cells[rot] = (p, each)
            (p0, e0), (p1, e1) = cells["none"], cells["hadamard"]
            if p0 is None or p1 is None:
                continue
            ratio = (p1 - fp) / (p0 - fp)
            summary[f"{method} {scheme}"] = {"none": p0, "hadamard": p1, "excess_ratio": ratio}
            md.append(f"| {scheme} | {method} | {p0:.3f}{e0} | {100 * (p0 / fp - 1):+.1f}% | {p1:.3f}{e1} | "
                      f"{100 * (p1 / fp - 1):+.1f}% | {ratio:.2f} |")  # fmt: skip
    rnd = mean([f"gptq int3-g128 random d{d}" for d in a.draws])
    if rnd is not None:
        md += ["", f"int3 g128 GPTQ with a random orthogonal rotation instead: {rnd:.3f} ({100 * (rnd / fp - 1):+.1f}%)."]
    secs = [r["rotate_seconds"] for r in rows if r["rotate"] == "hadamard"]
    md += ["", f"Fusing the rotation into the fp32 model took {max(secs):.1f} s at most (float64)."]
    return "\n".join(md) + "\n", summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--draws", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of config names to run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON list of configs (a job)
    ap.add_argument("--out", default="rotation")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table from a results JSON")
    a = ap.parse_args()
    if a.render:
        payload = json.loads(Path(a.render).read_text())
        a.draws = payload["protocol"]["draws"]
        md, payload["summary"] = table(payload["rows"], a, payload["machine"])
        for p in write_results(a.out, payload, md):
            print("wrote", p)
        return 0
    if a.worker:
        run(json.loads(Path(a.worker).read_text()), a)
        return 0
    m = machine()
    cfgs = [c for c in configs(a.draws) if not a.only or c["method"] == "fp" or any(o in c["name"] for o in a.only)]
    jobs, rows = [cfgs[i :: a.jobs] for i in range(a.jobs)], []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for k, job in enumerate(jobs):
            spec = Path(tmp) / f"job{k}.json"
            spec.write_text(json.dumps(job))
            cmd = [sys.executable, __file__, "--worker", str(spec), "--nsamples", str(a.nsamples), "--seqlen",
                   str(a.seqlen), "--eval-windows", str(a.eval_windows)] + (["--model", a.model] if a.model else [])  # fmt: skip
            env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        for p in procs:
            for line in p.stdout:
                print(line, end="", flush=True)
                if line.startswith("{"):
                    rows.append(json.loads(line))
            if p.wait() != 0:
                raise SystemExit("a worker failed")
    md, summary = table(rows, a, m)
    payload = {"machine": m, "protocol": {"nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.eval_windows,
                                          "draws": a.draws}, "rows": rows, "summary": summary}  # fmt: skip
    for p in write_results(a.out, payload, md):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
