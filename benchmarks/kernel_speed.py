"""Triton dequant-GEMM vs fp16 cuBLAS vs naive dequantize-then-matmul, on a CUDA GPU.

    python benchmarks/kernel_speed.py [--scheme int4-g128] [--shapes ...] [--ms 1 2 4 ...] [--decode-layers 4]

For each weight shape (out N × in K) and M, in one run: fp16 `torch.matmul(x, W.t())` (cuBLAS), llmq's
kernel (`llmq.kernels.triton_matmul`: split-K for M <= 16, tiled GEMM above; autotuned, so each shape
is warmed up first), and the naive path (dequantize the whole weight to fp16, then matmul: what the
reference backend does). Times from `triton.testing.do_bench` (median, ms -> µs). Achieved GB/s counts
the bytes each path must move once: weight (codes + scales + zeros for llmq, fp16 for cuBLAS) plus x
and y; % of peak uses the GPU's datasheet bandwidth when the name is known, and a measured
device-to-device copy otherwise (both are written into the results).

End to end: greedy decode of 128 tokens with a random-init Llama-7B-shaped model of `--decode-layers`
decoder layers (hidden 4096, intermediate 11008, 32 heads, vocab 32000), fp16 vs llmq int4 (triton
backend), same prompt, tokens/s.

Writes benchmarks/results/kernels.{json,md}. Needs CUDA (exits with a message otherwise).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_results  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]  # (N, K)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L4": 300, "A10": 600,
             "RTX 4090": 1008}  # fmt: skip
GOALS = {1: 3.5, 16: 3.0, 128: 1.5, 1024: 0.9, 4096: 0.9}  # speedup over fp16 at int4 g128 (issue 7)


def peak_gbps() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for k, v in PEAK_GBPS.items():
        if k in name:
            return float(v), f"datasheet ({k})"
    from triton.testing import do_bench

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6, "measured device-to-device copy"


def layer(N: int, K: int, scheme):
    from llmq.algorithms.rtn import rtn
    from llmq.backends.triton import repack as repack_for_triton

    W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
    qw = rtn(W.float(), scheme)
    return W, qw, repack_for_triton(qw)


def bench_shape(N, K, ms, scheme, peak):
    from triton.testing import do_bench

    from llmq.backends.triton import matmul as triton_matmul

    W, qw, packed = layer(N, K, scheme)
    q_bytes = sum(v.numel() * v.element_size() for v in packed["triton"].tensors().values())
    rows = []
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        triton_matmul(x, packed)  # autotune outside the timing
        io = 2 * (M * K + M * N)
        t_fp16 = do_bench(lambda: torch.matmul(x, W.t())) * 1e3
        t_ours = do_bench(lambda: triton_matmul(x, packed)) * 1e3
        t_naive = do_bench(lambda: torch.matmul(x, qw.dequantize(torch.float16).t())) * 1e3
        err = ((triton_matmul(x, packed).float() - x.float() @ qw.dequantize(torch.float32).t()).norm()
               / (x.float() @ qw.dequantize(torch.float32).t()).norm()).item()  # fmt: skip
        gbs = (q_bytes + io) / t_ours / 1e3
        rows.append({"N": N, "K": K, "M": M, "fp16_us": round(t_fp16, 2), "llmq_us": round(t_ours, 2),
                     "naive_us": round(t_naive, 2), "speedup_vs_fp16": round(t_fp16 / t_ours, 3),
                     "llmq_GBps": round(gbs), "pct_peak_bw": round(100 * gbs / peak, 1),
                     "fp16_GBps": round((2 * N * K + io) / t_fp16 / 1e3), "rel_err_vs_reference": err})  # fmt: skip
        print(rows[-1], flush=True)
    del W, qw, packed
    torch.cuda.empty_cache()
    return rows


def decode(layers: int, scheme, new_tokens: int = 128) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import llmq
    from llmq.pipeline import quantize

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).cuda().eval()
    ids = torch.randint(0, 32000, (1, 32), device="cuda")
    out = {}
    with tempfile.TemporaryDirectory() as d:
        qw = quantize(fp, scheme, method="rtn")
        llmq.save_quantized(fp, qw, Path(d) / "q", llmq.QuantPlan(scheme), {"name": "rtn"})
        q = llmq.load_quantized(Path(d) / "q", dtype=torch.float16, device="cuda", backend="triton")
        for name, m in (("fp16", fp), ("llmq", q)):
            m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up, autotune
            torch.cuda.synchronize()
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            out[f"{name}_tok_s"] = round(new_tokens / (time.perf_counter() - t), 1)
    out["ratio"] = round(out["llmq_tok_s"] / out["fp16_tok_s"], 3)
    return {"layers": layers, "new_tokens": new_tokens, **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="int4-g128")
    ap.add_argument("--ms", type=int, nargs="*", default=MS)
    ap.add_argument("--shapes", nargs="*", default=None, help="NxK, e.g. 4096x4096 (default: the six Llama shapes)")
    ap.add_argument("--decode-layers", type=int, default=4)
    ap.add_argument("--out", default="kernels")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU; the kernels' correctness runs on CPU in tests/test_kernels.py "
              "(Triton interpreter)", file=sys.stderr)  # fmt: skip
        return 2
    from llmq.config import scheme_from_name

    m = machine()
    m["gpu"] = torch.cuda.get_device_name()
    import triton

    m["triton"] = triton.__version__
    m["cuda"] = torch.version.cuda
    scheme = scheme_from_name(a.scheme)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    peak, peak_src = peak_gbps()
    rows = [r for N, K in shapes for r in bench_shape(N, K, a.ms, scheme, peak)]
    e2e = decode(a.decode_layers, scheme) if a.decode_layers else None
    md = [f"# Kernels: llmq {scheme.describe()} dequant-GEMM vs fp16 cuBLAS", "", machine_line(m),
          f"GPU: {m['gpu']}, CUDA {m['cuda']}, Triton {m['triton']}; peak bandwidth {peak:.0f} GB/s ({peak_src}).", "",
          "| N × K | M | fp16 µs | llmq µs | naive µs | speedup vs fp16 | llmq GB/s | % peak BW |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['N']}×{r['K']} | {r['M']} | {r['fp16_us']} | {r['llmq_us']} | {r['naive_us']} | "
                  f"{r['speedup_vs_fp16']}× | {r['llmq_GBps']} | {r['pct_peak_bw']} |")  # fmt: skip
    md += ["", "Goals at int4 g128 (issue 7), worst shape per M:", ""]
    for M, goal in GOALS.items():
        got = [r["speedup_vs_fp16"] for r in rows if r["M"] == M]
        if got:
            md.append(f"- M = {M}: goal ≥ {goal}×, measured {min(got)}×–{max(got)}× → {'met' if min(got) >= goal else 'NOT met'}")
    if e2e:
        md += ["", f"Decode, Llama-7B shapes, {e2e['layers']} layers, {e2e['new_tokens']} tokens: fp16 {e2e['fp16_tok_s']} "
               f"tok/s, llmq {e2e['llmq_tok_s']} tok/s ({e2e['ratio']}×)."]  # fmt: skip
    write_results(a.out, {"machine": m, "peak_GBps": peak, "peak_source": peak_src, "rows": rows, "decode": e2e},
                  "\n".join(md) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
