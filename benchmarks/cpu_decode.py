"""CPU decode speed: SmolLM2 greedy decoding, fp32 / bf16 transformers vs llmq int4 g128 and int8 (cpu backend),
plus single-matmul timings at Llama-7B shapes.

    python benchmarks/cpu_decode.py [--model PATH] [--tokens 128] [--repeats 3] [--out cpu_decode]

Each variant runs in its own subprocess (so its peak RSS is its own), one after another in the same run.
Decode tokens/s = (tokens - 1) / (time of `generate(tokens)` - time of `generate(1)`), median of repeats;
first-token latency = time of `generate(max_new_tokens=1)` (prompt prefill + one token). min_new_tokens
forces exactly `tokens` tokens. The llmq models are RTN checkpoints written by `llmq quantize` and loaded
with `AutoModelForCausalLM.from_pretrained` (backend auto = cpu for these schemes; its kernels take bf16
activations, so "fp32 model" / "bf16 model" is the dtype of everything else: embeddings, norms, attention, head).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, peak_rss_mb, write_results  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
VARIANTS = {  # name: (checkpoint key or None for the fp model, dtype, compiled: static KV cache + torch.compile)
    "fp32 (transformers)": (None, "float32", False),
    "bf16 (transformers)": (None, "bfloat16", False),
    "llmq int4 g128, bf16 model": ("int4", "bfloat16", False),
    "llmq int4 g128, fp32 model": ("int4", "float32", False),
    "llmq int8 per-channel, fp32 model": ("int8", "float32", False),
    "llmq int8 per-channel, bf16 model": ("int8", "bfloat16", False),
    "fp32 (transformers), compiled": (None, "float32", True),
    "bf16 (transformers), compiled": (None, "bfloat16", True),
    "llmq int4 g128, bf16 model, compiled": ("int4", "bfloat16", True),
    "llmq int8 per-channel, bf16 model, compiled": ("int8", "bfloat16", True),
}
CKPT_ARGS = {"int4": ["--bits", "4", "--group-size", "128"], "int8": ["--bits", "8", "--group-size", "-1"]}


def run_variant(model_path: str, dtype: str, tokens: int, repeats: int, compiled: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmq  # noqa: F401  (registers the loader)
    from llmq import sources
    from llmq.nn import QuantLinear

    dt = getattr(torch, dtype)
    src = sources.resolve(model_path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dt, **src.kwargs()).eval()
    tok = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    load_s = time.perf_counter() - t0
    backends = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if compiled:
        llmq.compile_decoding(model, max_cache_len=ids["input_ids"].shape[1] + tokens)

    def gen(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out

    t0 = time.perf_counter()
    gen(4)  # warm-up (compiles the decoding step when compiled)
    warm_s = time.perf_counter() - t0
    firsts, totals = [], []
    for _ in range(repeats):
        firsts.append(gen(1)[0])
        t, out = gen(tokens)
        totals.append(t)
    first, total = statistics.median(firsts), statistics.median(totals)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"dtype": dtype, "compiled": compiled, "warmup_s": round(warm_s, 1), "backends": backends, "load_s": round(load_s, 2), "prompt_tokens": ids["input_ids"].shape[1],
            "first_token_ms": round(1000 * first, 1), "decode_tok_s": round((tokens - 1) / (total - first), 2),
            "total_s": round(total, 2), "peak_rss_mb": round(peak_rss_mb()), "sample": text[:160],
            "footprint_mb": round(model.get_memory_footprint() / 2**20, 1)}  # fmt: skip


def matmul_table(repeats: int = 20) -> list[dict]:
    """µs per call at Llama-7B linear shapes; random weights; same process, interleaved."""
    from torch.utils.benchmark import Timer

    from llmq.algorithms.rtn import rtn
    from llmq.backends.cpu import matmul as cpu_matmul
    from llmq.backends.cpu import repack_int4, repack_int8
    from llmq.config import QuantScheme

    rows = []
    for K, N in ((4096, 4096), (4096, 11008), (11008, 4096)):
        W = torch.randn(N, K) * 0.02
        p4 = repack_int4(rtn(W, QuantScheme(bits=4, group_size=128)))
        p8 = repack_int8(rtn(W, QuantScheme(bits=8, group_size=-1)))
        Wb = W.to(torch.bfloat16)
        for M in (1, 16):
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            cases = {"fp32 F.linear": lambda: torch.nn.functional.linear(x, W),
                     "bf16 F.linear": lambda: torch.nn.functional.linear(xb, Wb),
                     "int4 g128 (bf16 act.)": lambda: cpu_matmul(xb, p4),
                     "int8 per-channel (bf16 act.)": lambda: cpu_matmul(xb, p8)}  # fmt: skip
            t = {k: Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.3).median * 1e6 for k, f in cases.items()}
            for k, us in t.items():
                rows.append({"shape": f"{K}x{N}", "M": M, "kernel": k, "us": round(us, 1),
                             "speedup_vs_fp32": round(t["fp32 F.linear"] / us, 2)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="cpu_decode")
    ap.add_argument("--variants", nargs="*", default=None, metavar="SUBSTRING",
                    help="run only the variants whose names contain one of these (the fp32 eager baseline always runs)")
    ap.add_argument("--run", nargs=3, metavar=("MODEL", "DTYPE", "COMPILED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    m = machine()  # at the start: the code this run imported
    if a.run:
        print(json.dumps(run_variant(a.run[0], a.run[1], a.tokens, a.repeats, a.run[2] == "1")))
        return 0
    model = a.model or default_model()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        for key, args in CKPT_ARGS.items():
            ckpts[key] = str(Path(tmp, key))
            subprocess.run([sys.executable, "-m", "llmq", "quantize", model, ckpts[key], "--quiet", *args], check=True)
        for name, (key, dtype, compiled) in VARIANTS.items():
            if a.variants and name != "fp32 (transformers)" and not any(v in name for v in a.variants):
                continue
            path = model if key is None else ckpts[key]
            r = subprocess.run([sys.executable, __file__, "--run", path, dtype, str(int(compiled)), "--tokens", str(a.tokens),
                                "--repeats", str(a.repeats)], capture_output=True, text=True)  # fmt: skip
            if r.returncode:  # recorded, not fatal: the other variants still run
                err = [ln for ln in r.stderr.splitlines() if "Error" in ln or "error" in ln]
                results[name] = {"error": (err[-1] if err else r.stderr[-300:])[:300], "backends": []}
                print(name, "FAILED:", results[name]["error"], flush=True)
                continue
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(name, results[name]["decode_tok_s"], "tok/s", flush=True)
    mm = matmul_table()
    base = results["fp32 (transformers)"]["decode_tok_s"]
    md = [f"# CPU decode: {Path(model).name}", "", machine_line(m), "",
          f"Greedy decoding of {a.tokens} tokens after a {results['fp32 (transformers)']['prompt_tokens']}-token chat "
          f"prompt, median of {a.repeats}. Each variant" + __doc__.split("Each variant")[1].split("\n\n")[0].replace("\n", " "), "",
          "\"compiled\" = `llmq.compile_decoding(model, max_cache_len=prompt + tokens)`: a static KV cache and a "
          "torch.compile'd decoding step through transformers' own generate(); the one-time compile is the warm-up "
          "column, not counted in tokens/s. vs fp32 = against plain eager fp32 transformers.", "",
          "| variant | backend | decode tok/s | vs fp32 | first token (ms) | warm-up (s) | peak RSS (MB) | model footprint (MB) |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in results.items():
        if "error" in r:
            md.append(f"| {name} | - | failed: {r['error']} | | | | | |")
            continue
        md.append(f"| {name} | {', '.join(r['backends']) or 'torch'} | {r['decode_tok_s']:.1f} | "
                  f"{r['decode_tok_s'] / base:.2f}x | {r['first_token_ms']:.0f} | {r['warmup_s']} | {r['peak_rss_mb']} | "
                  f"{r['footprint_mb']} |")  # fmt: skip
    md += ["", "## Single matmul, Llama-7B shapes (K×N = in×out), µs per call", "",
           "| shape | M | kernel | µs | vs fp32 |", "| --- | ---: | --- | ---: | ---: |"]
    md += [f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['us']} | {r['speedup_vs_fp32']}x |" for r in mm]
    j, p = write_results(a.out, {"machine": m, "tokens": a.tokens, "decode": results, "matmul": mm}, "\n".join(md) + "\n")
    print(f"wrote {j} and {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
