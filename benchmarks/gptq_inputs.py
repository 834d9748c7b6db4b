"""GPTQ's Hessians from quantized or from full-precision inputs, side by side on the real model.

    python benchmarks/gptq_inputs.py [--model PATH] [--schemes int3-g64-dq int4-g128 ...] [--nsamples 32]
                                     [--seqlen 512] [--eval-windows 10] [--out gptq_inputs]

Same protocol as benchmarks/mixed.py (evaluation: the first `eval-windows` windows of 2048 tokens of
WikiText-2 test; calibration: `nsamples` x `seqlen` tokens from the second half of the same token stream).
Every scheme is quantized twice through llmq's pipeline, GPTQ act-order + static groups + clip search, once
with GPTQConfig(inputs="quantized") (standard GPTQ: each linear's H from the outputs of the already-quantized
layers) and once with inputs="fp" (H from the full-precision model's activations); perplexity and
quantization time of each.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, real_setup, write_results  # noqa: E402
from llmq.eval.perplexity import perplexity  # noqa: E402

from llmq.config import GPTQ_INPUTS, GPTQConfig, QuantPlan, scheme_from_name  # noqa: E402
from llmq.modeling import fake_quantize  # noqa: E402
from llmq.pipeline import quantize  # noqa: E402

SCHEMES = ("int2-g32-dq", "int3-g128-dq", "int3-g64-dq", "int4-g128", "nf4-g64-dq")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--out", default="gptq_inputs")
    a = ap.parse_args()
    m = machine()
    r = real_setup(a.model, a.nsamples, a.seqlen, a.eval_windows)
    src, fp_model, calib, eval_tokens = r.src, r.fp_model, r.calib, r.eval_tokens
    fp_ppl = perplexity(fp_model, eval_tokens, 2048)["perplexity"]
    print(f"fp {fp_ppl:.3f}", flush=True)
    rows = []
    for name in a.schemes:
        row = {"scheme": name}
        for inputs in GPTQ_INPUTS:
            model = copy.deepcopy(fp_model)
            t = time.perf_counter()
            qw = quantize(model, QuantPlan(scheme_from_name(name, clip_search=True)), calib, method="gptq",
                          gptq=GPTQConfig(inputs=inputs))  # fmt: skip
            secs = time.perf_counter() - t
            fake_quantize(model, qw)
            row["bits_per_weight"] = 8 * sum(q.nbytes() for q in qw.values()) / sum(q.shape[0] * q.shape[1]
                                                                                  for q in qw.values())  # fmt: skip
            row[inputs] = {"perplexity": perplexity(model, eval_tokens, 2048)["perplexity"],
                           "quant_seconds": round(secs, 1)}  # fmt: skip
            print(f"{name} inputs={inputs}: ppl {row[inputs]['perplexity']:.3f} ({secs:.0f}s)", flush=True)
            del model, qw
        rows.append(row)
    protocol = {**r.protocol, "method": "GPTQ, act-order + static groups + clip search, damp 0.01", "model": str(src)}
    payload = {"machine": m, "protocol": protocol, "fp_perplexity": fp_ppl, "rows": rows}
    lines = [f"# GPTQ Hessians from quantized vs full-precision inputs: {Path(str(src)).name}", "", machine_line(m), "",
             f"Eval: {protocol['eval']}. Calibration: {protocol['calibration']}. Every model: {protocol['method']}; "
             f"fp perplexity {fp_ppl:.3f}. `quantized` = standard GPTQ (H from the outputs of the already-quantized "
             "layers), `fp` = H from the full-precision model's activations (`--gptq-inputs fp`).", "",
             "| scheme | bits/w | ppl, quantized inputs | ppl, fp inputs | change | time q / fp (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        q, f = r["quantized"], r["fp"]
        change = 100 * (math.exp(math.log(f["perplexity"]) - math.log(q["perplexity"])) - 1)
        lines.append(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {q['perplexity']:.3f} | {f['perplexity']:.3f} | "
                     f"{change:+.1f}% | {q['quant_seconds']:.0f} / {f['quant_seconds']:.0f} |")  # fmt: skip
    for p in write_results(a.out, payload, "\n".join(lines) + "\n"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
