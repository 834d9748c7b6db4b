"""Quality of RTN vs GPTQ on the real model: perplexity, bits per weight, quantization time, peak RSS.

    python benchmarks/quality.py [--model PATH] [--data DIR] [--nsamples 32] [--seqlen 512]
                                 [--eval-windows 10] [--only NAME ...] [--out NAME]

Protocol (written into the results): WikiText-2 test, rows joined with "\\n\\n", tokenized once without
BOS. Evaluation = the first `eval-windows` non-overlapping windows of 2048 tokens (llmq.eval.perplexity).
Calibration = `nsamples` windows of `seqlen` tokens drawn (seed 0) from the second half of the same
token stream, so calibration and evaluation text are disjoint. Each quantized model is evaluated as the
fake-quantized model (dequantized weights, other tensors rounded through fp16), which computes the same
logits as its checkpoint loaded back (tests/test_checkpoint.py). Peak RSS is the process high-water mark
during quantization (reset before each run), including the resident fp32 model.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, peak_rss_mb, reset_peak_rss, write_results  # noqa: E402
from llmq.eval.perplexity import perplexity, text_sha256  # noqa: E402

from llmq import sources  # noqa: E402
from llmq.calibration import draw_windows, tokenize_text  # noqa: E402
from llmq.config import CalibConfig, GPTQConfig, QuantScheme  # noqa: E402
from llmq.data import load_text  # noqa: E402
from llmq.modeling import fake_quantize  # noqa: E402
from llmq.pipeline import quantize  # noqa: E402

S = QuantScheme
BASE = {"int4-g128": S(bits=4, group_size=128), "int3-g128": S(bits=3, group_size=128),
        "int4-pc": S(bits=4, group_size=-1), "nf4-g64": S(format="nf4", group_size=64)}  # fmt: skip
AO = GPTQConfig(act_order=True, static_groups=True)
NO_AO = GPTQConfig(act_order=False)


def with_(s: QuantScheme, **kw) -> QuantScheme:
    return QuantScheme(**(s.to_dict() | kw))


def configs() -> list[tuple[str, str, QuantScheme, GPTQConfig | None]]:
    """Each scheme with and without double quant: plain RTN (its best setting here: weight-MSE clipping
    makes RTN worse on this model, shown separately) vs GPTQ with act-order, static groups and a
    diag(H)-weighted clip search (llmq's recommended setting). Then single-knob variants at int4 g128."""
    out = []
    for name, s in BASE.items():
        for dq in (False, True):
            tag = name + ("-dq" if dq else "")
            out.append((f"rtn {tag}", "rtn", with_(s, double_quant=dq), None))
            out.append((f"gptq {tag}", "gptq", with_(s, double_quant=dq, clip_search=True), AO))
    i4, i3 = BASE["int4-g128"], BASE["int3-g128"]
    out += [
        ("rtn int4-g128 +clip", "rtn", with_(i4, clip_search=True), None),
        ("gptq int4-g128 no-clip", "gptq", i4, AO),
        ("gptq int4-g128 no-act-order", "gptq", with_(i4, clip_search=True), NO_AO),
        ("gptq int4-g128 act-order+perm", "gptq", with_(i4, clip_search=True), GPTQConfig(static_groups=False)),
        ("rtn int4-g128 +outliers", "rtn", with_(i4, outliers=0.005), None),
        ("gptq int4-g128 +outliers", "gptq", with_(i4, clip_search=True, outliers=0.005), AO),
        ("rtn int3-g128 +outliers", "rtn", with_(i3, outliers=0.005), None),
        ("gptq int3-g128 +outliers", "gptq", with_(i3, clip_search=True, outliers=0.005), AO),
    ]
    return out


def payload_bytes(model, qweights) -> int:
    """Bytes the checkpoint's tensors hold: quantized parts + everything else in fp16."""
    from llmq.codec import checkpoint_tensors

    return sum(t.numel() * t.element_size() for chunk in checkpoint_tensors(model, qweights, torch.float16)
               for t in chunk.values())  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None, help="wikitext-2-raw dir (default: the local copy)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of config names to run")
    ap.add_argument("--out", default="quality")
    a = ap.parse_args()
    m = machine()  # at the start: the code this run imported

    src = sources.resolve(a.model or default_model())
    fp_model, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    text, where = load_text(a.data, "test")
    tokens = tokenize_text(tok, text)
    ccfg = CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, seed=0, split="test", token_range=(0.5, 1.0))
    calib = draw_windows(tokens, ccfg)
    eval_end = a.eval_windows * 2048
    assert eval_end <= len(tokens) // 2, "evaluation text would overlap the calibration half"
    eval_tokens = tokens[:eval_end]

    def ppl(model) -> float:
        return perplexity(model, eval_tokens, 2048)["perplexity"]

    rows = [{"name": "fp32 (dequantized Q4_1 GGUF)", "method": "fp", "perplexity": ppl(fp_model),
             "bits_per_weight": None, "quant_seconds": None, "peak_rss_mb": None}]  # fmt: skip
    print(f"fp: {rows[0]['perplexity']:.3f}", flush=True)
    for name, method, scheme, gcfg in configs():
        if a.only and not any(o in name for o in a.only):
            continue
        model = copy.deepcopy(fp_model)
        reset_peak_rss()
        t0 = time.perf_counter()
        qw = quantize(model, scheme, calib if method == "gptq" else None, method=method, gptq=gcfg)
        secs = time.perf_counter() - t0
        rss = peak_rss_mb()
        fake_quantize(model, qw)
        bits = 8 * sum(q.nbytes() for q in qw.values()) / sum(q.shape[0] * q.shape[1] for q in qw.values())
        row = {"name": name, "method": method, "scheme": scheme.describe(), "gptq": None if gcfg is None else vars(gcfg),
               "perplexity": ppl(model), "bits_per_weight": bits, "quant_seconds": round(secs, 1),
               "peak_rss_mb": round(rss), "payload_bytes": payload_bytes(model, qw)}  # fmt: skip
        rows.append(row)
        print(f"{name}: ppl {row['perplexity']:.3f}, {bits:.3f} bpw, {secs:.0f}s, {rss:.0f} MB", flush=True)
        del model, qw

    protocol = {"eval": f"WikiText-2 test ({where}, sha256 {text_sha256(text)[:16]}), first {a.eval_windows} "
                        f"non-overlapping windows of 2048 tokens = {eval_end:,} tokens, no BOS",
                "calibration": f"{a.nsamples} x {a.seqlen} tokens, seed 0, drawn from the second half of the same "
                               f"token stream (tokens {len(tokens) // 2:,}..{len(tokens):,}): disjoint from eval",
                "model": str(src), "note": __doc__.split("Protocol")[1].strip()}  # fmt: skip
    fp = rows[0]["perplexity"]
    md = [f"# Quality: RTN vs GPTQ on {Path(str(src)).name}", "", machine_line(m), "",
          f"Eval: {protocol['eval']}. Calibration: {protocol['calibration']}. RTN runs are plain round-to-nearest "
          "unless marked +clip; GPTQ runs use act-order + static groups + a diag(H)-weighted clip search unless "
          "marked. Outliers: 0.5% of weights in fp16. Quantization times were taken while other work shared "
          "the 2 cores.", "",
          "| config | perplexity | Δ vs fp | bits/weight | quant time (s) | peak RSS (MB) |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-"
        d = f"{r['perplexity'] - fp:+.3f}" if r["method"] != "fp" else "-"
        md.append(f"| {r['name']} | {r['perplexity']:.3f} | {d} | {bpw} | {r['quant_seconds'] or '-'} | "
                  f"{r['peak_rss_mb'] or '-'} |")  # fmt: skip
    j, mdp = write_results(a.out, {"machine": m, "protocol": protocol, "rows": rows}, "\n".join(md) + "\n")
    print(f"wrote {j} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
