"""Everything llmq claims about GPUs, in one prepared run: the Triton kernels natively, their speed against fp16
cuBLAS and PyTorch's int4 kernel, GPTQ on CUDA of Llama-2-7B- and 70B-shaped decoder layers, and torchrun over NCCL.

    python benchmarks/gpu_check.py --out DIR               # on a CUDA machine (< 8 min on one H100/H200)
    python benchmarks/gpu_check.py --cpu-dry-run --out DIR # every step on the CPU: tiny shapes, Triton's interpreter,
                                                           # gloo (tests/test_gpu_check.py runs it in CI)

Steps, in this order (the cheap, decisive ones first, so a run cut short still answers the main questions); each
step's result (or its error and traceback) is written to DIR/gpu.json and DIR/gpu.md as soon as it ends, and a
failed step does not stop the next:

  environment     GPU name and count, CUDA, driver-side memory, torch / triton / transformers versions; the
                  measured device-to-device copy bandwidth every kernel row is compared with.
  e2e_triton      a tiny random-init Llama quantized (RTN int4 g128), written, loaded through `from_pretrained`
                  (`load_quantized`) with the triton backend and with the reference backend: logits compared
                  against the kernel tests' fp16 tolerance.
  kernel_timings  int4 / int8 / NF4 / int3 at g128, with and without double-quantized scales, M = 1, 16, 128,
                  (K, N) = (4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192): llmq's kernel
                  (`llmq.backends.triton.matmul`: split-K for M <= 16, tiled GEMM above, autotuned outside the
                  timing), fp16 `torch.matmul` (cuBLAS) and PyTorch's int4 kernel (`aten._weight_int4pack_mm`, on the
                  same int4 g128 codes); median times from `triton.testing.do_bench`; achieved bandwidth = the bytes
                  each path must read once (weight + x + y) / time, as a fraction of the copy bandwidth.
  gptq_layers     GPTQ (llmq's default recipe: act-order, static groups, clip search, true-sequential groups with
                  replay) of one decoder layer of Llama-2-7B's and of Llama-2-70B's shape, random fp16 weights,
                  128 x 2048 random activations with a few heavy channels, all on the GPU; seconds per phase from
                  llmq's own accounting (llmq/timing.py) and peak GPU memory.
  torchrun        `torchrun --nproc-per-node 1 -m llmq quantize TINY OUT --method gptq --device cuda` (NCCL), compared
                  tensor by tensor with the single-process checkpoint; `--nproc-per-node 2` too when two GPUs are
                  visible (codes within 1% of the bytes: reordered sums).
  kernel_tests    `pytest tests/test_kernels.py` natively (no interpreter), the tiny model through `from_pretrained`
                  with the triton backend included; last, as it compiles every format's kernels.

Targets (issue 39), judged in gpu.md: int4 g128 at M = 1 on (8192, 28672) >= 3.5x fp16 cuBLAS and >= 85% of copy
bandwidth; at M = 16 not slower than fp16; GPTQ of the 7B-shaped layer <= 4 s, the 70B-shaped <= 10 s; triton logits
equal the reference's within the kernel tests' tolerance. Nothing is downloaded and nothing is pip-installed: only
the checkout is needed beside torch, triton and transformers (pytest only for the kernel_tests step).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU = {
    "shapes": [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)],  # (K, N)
    "layers": {"llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                  num_key_value_heads=32),
               "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                   num_key_value_heads=8)},
    "calib": (128, 2048),
    "ms": (1, 16, 128),
}  # fmt: skip
DRY = {
    "shapes": [(256, 160), (200, 96)],  # (200, 96): a short last group
    "layers": {"tiny-a": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4),
               "tiny-b": dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)},
    "calib": (4, 64),
    "ms": (1, 17),  # the split-K kernel and the tiled GEMM, each once (the interpreter is slow)
}  # fmt: skip
SCHEMES = ["int4-g128", "int4-g128-dq", "int8-g128", "int8-g128-dq", "nf4-g128", "nf4-g128-dq", "int3-g128",
           "int3-g128-dq"]  # fmt: skip
FP16_TOL = 2e-3  # tests/test_kernels.py: the kernel against the reference with fp16 activations
TARGETS = {"m1_speedup": 3.5, "m1_copy_bw": 0.85, "m16_speedup": 1.0, "gptq_7b_s": 4.0, "gptq_70b_s": 10.0}


# ---- steps --------------------------------------------------------------------------------------------------------
def environment(dev) -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": dev, "git": _git()}  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError as e:
        out["triton"] = f"not installed ({e})"
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        out |= {"gpu": p.name, "gpus": torch.cuda.device_count(), "gpu_memory_gb": round(p.total_memory / 1e9, 1),
                "sms": p.multi_processor_count, "cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}"}  # fmt: skip
    a = torch.empty(1 << (30 if dev == "cuda" else 24), dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    out["copy_GBps"] = round(2 * a.numel() / bench(lambda: b.copy_(a), dev) / 1e3, 1)  # read + write, per µs -> GB/s
    return out


def e2e_triton(dev) -> dict:
    """The tiny model's logits with the triton backend against the reference backend, through from_pretrained."""
    import torch
    from tiny import make_tiny

    import llmq
    from llmq.config import scheme_from_name

    model = make_tiny("llama", vocab=256, num_hidden_layers=2)
    plan = llmq.QuantPlan(scheme_from_name("int4-g128"))
    qw = llmq.quantize(model, plan, method="rtn")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(dev)
    with tempfile.TemporaryDirectory() as d:
        llmq.save_quantized(model, qw, Path(d) / "q", plan, {"name": "rtn"})
        logits = {}
        for backend in ("triton", "reference"):
            m = llmq.load_quantized(Path(d) / "q", dtype=torch.float16, device=dev, backend=backend)
            with torch.no_grad():
                logits[backend] = m(ids).logits.float()
    err = rel(logits["triton"], logits["reference"])
    return {"rel_err_logits": err, "tolerance": FP16_TOL, "ok": err < FP16_TOL}


def kernel_timings(dev, shapes, schemes, ms) -> dict:
    import torch

    from llmq.algorithms.rtn import rtn
    from llmq.backends.triton import matmul as triton_matmul
    from llmq.backends.triton import repack as triton_repack
    from llmq.config import scheme_from_name

    rows = []
    for K, N in shapes:
        W = (torch.randn(N, K, device=dev) * 0.02).to(torch.float16)
        xs = {M: torch.randn(M, K, device=dev, dtype=torch.float16) for M in ms}
        io = {M: 2 * (M * K + M * N) for M in ms}
        base = {M: bench(functools.partial(torch.matmul, xs[M], W.t()), dev) for M in ms}
        q4 = rtn(W.float(), scheme_from_name("int4-g128"))
        int4 = torch_int4(q4, dev)
        t_int4 = {M: bench(functools.partial(int4, xs[M]), dev) for M in ms} if int4 else {}
        # the baseline must compute what llmq's codes hold, else its time compares nothing
        int4_err = rel(int4(xs[ms[-1]]), xs[ms[-1]].float() @ q4.dequantize(torch.float32).t()) if int4 else None
        for name in schemes:
            qw = rtn(W.float(), scheme_from_name(name))
            packed = triton_repack(qw)
            wbytes = sum(v.numel() * v.element_size() for v in packed["triton"].tensors().values())
            for M in ms:
                x = xs[M]
                y = triton_matmul(x, packed)  # autotune outside the timing
                err = rel(y, x.float() @ qw.dequantize(torch.float32).t())
                t = bench(functools.partial(triton_matmul, x, packed), dev)
                row = {"K": K, "N": N, "M": M, "scheme": name, "llmq_us": round(t, 2), "fp16_us": round(base[M], 2),
                       "speedup_vs_fp16": round(base[M] / t, 3), "weight_bytes": wbytes,
                       "llmq_GBps": round((wbytes + io[M]) / t / 1e3, 1),
                       "fp16_GBps": round((2 * N * K + io[M]) / base[M] / 1e3, 1), "rel_err": err}  # fmt: skip
                if M in t_int4:
                    row |= {"torch_int4_us": round(t_int4[M], 2), "speedup_vs_torch_int4": round(t_int4[M] / t, 3),
                            "torch_int4_rel_err": int4_err}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del qw, packed
        del W, xs, int4, q4
        if dev == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def torch_int4(qw, dev):
    """PyTorch's own int4 g128 kernel on the same codes and scales (tinygemm: w = (q - 8)·s + zero', bf16), as a
    function of x; on the CPU its CPU twin (the cpu backend's kernel). None where the shape does not fit it."""
    import torch

    from llmq.backends import cpu

    N, K = qw.shape
    if cpu.why_not(qw.scheme, (N, K), torch.device("cpu")) is not None or (dev == "cuda" and K % 1024):
        return None  # CUDA's packing: K a multiple of inner_k_tiles (8) x 128
    p = cpu.int4_operands(qw)  # codes [N, Kp] int32 in 0..15, sz [Kp/g, N, 2] bf16; K padded to Kp on the CPU only
    if dev == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(p["codes"], 1)
        pad = p["pad"]
        return lambda x: torch._weight_int4pack_mm_for_cpu(torch.nn.functional.pad(x.to(torch.bfloat16), (0, pad)),
                                                           packed, p["gs"], p["sz"])  # fmt: skip
    codes = p["codes"].to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), 8)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, p["gs"], p["sz"])


def gptq_layers(dev, layers: dict, calib: tuple[int, int]) -> dict:
    """GPTQ of one decoder layer per shape in `layers`, on random fp16 weights and heavy-channel activations."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq import timing
    from llmq.archs import arch_for, decoder_layers
    from llmq.config import GPTQConfig, QuantPlan, scheme_from_name
    from llmq.pipeline import gptq_layer, start_activations

    out = {}
    for name, shape in layers.items():
        n, L = calib
        cfg = LlamaConfig(num_hidden_layers=1, vocab_size=256, max_position_embeddings=max(4096, L), **shape)
        torch.manual_seed(0)
        dtype = torch.float16 if dev == "cuda" else torch.float32
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        spec = arch_for(model.config)
        ids = torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(0))
        acts = start_activations(model, spec, ids, device=dev, act_device=dev)  # the layer's args (rotary, mask)
        H = shape["hidden_size"]
        g = torch.Generator(device=dev).manual_seed(1)
        heavy = torch.randperm(H, generator=torch.Generator().manual_seed(2))[:4].to(dev)
        for k in range(n):  # random activations, 4 channels ~50x the rest (as real models' outlier channels)
            x = torch.randn(1, L, H, generator=g, device=dev)
            x[..., heavy] *= 50
            acts.inps[k] = x.to(dtype)
        plan = QuantPlan(scheme_from_name("int4-g128", clip_search=True))
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with timing.Phases(dev) as ph:
            q, rep = gptq_layer(decoder_layers(model, spec)[0], 0, spec, plan, GPTQConfig(act_order=True,
                                                                                         static_groups=True), acts)
        rep = rep.timed(ph)
        out[name] = {"shape": shape, "calibration": f"{n} x {L}", "seconds": round(rep.seconds, 3),
                     "phases": {k: round(v, 3) for k, v in rep.phases.items()}, "passes": rep.passes,
                     "replays": rep.replays, "rel_output_error": rep.rel_error, "linears": len(q),
                     "bits_per_weight": round(sum(rep.modules.values()) / len(rep.modules), 4)}  # fmt: skip
        if dev == "cuda":
            out[name]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps({name: out[name]}), flush=True)
        del model, acts, q
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def torchrun_step(dev, work: Path) -> dict:
    """torchrun (NCCL on CUDA, gloo on the CPU) against one process, same command, tensor by tensor."""
    import torch
    from tiny import SAMPLE_TEXT, make_tiny, make_tokenizer

    model_dir, calib = work / "tiny", work / "calib.txt"
    make_tiny("llama", vocab=300).save_pretrained(model_dir)
    make_tokenizer(300).save_pretrained(model_dir)
    calib.write_text(SAMPLE_TEXT)
    args = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--calib", str(calib), "--device", dev, "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = {"single": [sys.executable, "-m", "llmq", "quantize", str(model_dir), str(work / "single"), *args]}
    nprocs = [1] + ([2] if dev == "cuda" and torch.cuda.device_count() >= 2 else [])
    for n in nprocs:
        runs[f"torchrun-{n}"] = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                                 "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "llmq",
                                 "quantize", str(model_dir), str(work / f"torchrun-{n}"), *args]  # fmt: skip
    out: dict = {"nprocs": nprocs, "backend": "nccl" if dev == "cuda" else "gloo"}
    # torchrun with one process leaves llmq single-process (WORLD_SIZE 1: nothing to communicate), so the process
    # group itself is probed: init, all_reduce and an object broadcast, as distributed.World uses them
    probe = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                            "127.0.0.1", "--master-port", str(_free_port()), "--no-python", sys.executable, "-c",
                            PROBE.format(backend=out["backend"], dev=dev)], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    out["process_group_probe"] = probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 else probe.stderr[-1500:]
    if probe.returncode:
        raise RuntimeError(f"{out['backend']} process group probe failed: {probe.stderr[-1500:]}")
    for name, cmd in runs.items():
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if p.returncode:
            raise RuntimeError(f"{name} exited {p.returncode}: {p.stderr[-2000:]}")
        summary = json.loads((work / name / "summary.json").read_text())
        out[name] = {"seconds": round(time.perf_counter() - t, 1), "distributed": summary.get("distributed")}
    ref = _tensors(work / "single")
    for n in nprocs:
        got = _tensors(work / f"torchrun-{n}")
        same = sorted(ref) == sorted(got) and all(ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape
                                                  for k in ref)  # fmt: skip
        diff = sum(int((ref[k].view(-1).view(torch.uint8) != got[k].view(-1).view(torch.uint8)).sum())
                   for k in ref if same)  # fmt: skip
        total = sum(ref[k].numel() * ref[k].element_size() for k in ref)
        out[f"torchrun-{n}"] |= {"same_tensors": same, "bytes_differing": diff, "bytes": total,
                                 "ok": same and (diff == 0 if n == 1 else diff <= 0.01 * total)}  # fmt: skip
    out["ok"] = all(out[f"torchrun-{n}"]["ok"] for n in nprocs)
    if len(nprocs) == 1:
        out["note"] = ("one GPU: llmq's own collectives did not run (one rank has nothing to send; two ranks on one GPU "
                       "are refused by design); the process group was probed instead")  # fmt: skip
    return out


PROBE = """import json, torch, torch.distributed as d
d.init_process_group("{backend}")
if "{dev}" == "cuda":
    torch.cuda.set_device(d.get_rank())
t = torch.full((4,), d.get_rank() + 1.0, device="{dev}")
d.all_reduce(t)
o = ["from rank 0"] if d.get_rank() == 0 else [None]
d.broadcast_object_list(o, 0, device=torch.device("{dev}"))
print(json.dumps(dict(backend=d.get_backend(), world=d.get_world_size(), all_reduce=t.tolist(), broadcast=o[0])))
d.destroy_process_group()
"""


def kernel_tests(dev, dry: bool) -> dict:
    """pytest tests/test_kernels.py natively (on the CPU under the interpreter, a few of them)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise RuntimeError("pytest is not installed on this machine; the other steps cover the kernels' results")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_kernels.py")]
    if dry:
        cmd += ["-k", "int4-sym-g128 and 1] or from_pretrained"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    return {"returncode": p.returncode, "summary": tail, "ok": p.returncode == 0,
            **({"output_tail": p.stdout[-4000:]} if p.returncode else {})}  # fmt: skip


# ---- helpers ------------------------------------------------------------------------------------------------------
def bench(fn, dev) -> float:
    """Median microseconds of fn(): triton's do_bench on CUDA (L2 flushed between calls); one call on the CPU."""
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") * 1e3
    t = time.perf_counter()  # the dry run proves the code path; its times mean nothing (interpreter)
    fn()
    return (time.perf_counter() - t) * 1e6


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _tensors(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("model-*.safetensors")):
        with safe_open(f, "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return p.stdout.strip() or "unknown"


# ---- report -------------------------------------------------------------------------------------------------------
def verdicts(res: dict) -> list[str]:
    """The issue's targets against what this run measured (only what it measured)."""
    out = []
    env = res.get("environment", {})
    rows = res.get("kernel_timings", {}).get("rows", [])
    big = [r for r in rows if r["scheme"] == "int4-g128" and (r["K"], r["N"]) == max((r["K"], r["N"]) for r in rows)]
    for r in big:
        if r["M"] == 1:
            bw = r["llmq_GBps"] / env["copy_GBps"] if env.get("copy_GBps") else None
            out.append(f"int4 g128, M = 1, K×N = {r['K']}×{r['N']}: {r['speedup_vs_fp16']}× fp16 (target ≥ "
                       f"{TARGETS['m1_speedup']}×: {_met(r['speedup_vs_fp16'] >= TARGETS['m1_speedup'])}), "
                       f"{bw:.0%} of copy bandwidth (target ≥ {TARGETS['m1_copy_bw']:.0%}: "
                       f"{_met(bw is not None and bw >= TARGETS['m1_copy_bw'])})")  # fmt: skip
        if r["M"] == 16:
            out.append(f"int4 g128, M = 16, K×N = {r['K']}×{r['N']}: {r['speedup_vs_fp16']}× fp16 (target ≥ 1×: "
                       f"{_met(r['speedup_vs_fp16'] >= TARGETS['m16_speedup'])})")  # fmt: skip
    for name, key in (("llama-2-7b", "gptq_7b_s"), ("llama-2-70b", "gptq_70b_s")):
        g = res.get("gptq_layers", {}).get(name)
        if g:
            out.append(f"GPTQ of a {name}-shaped layer: {g['seconds']} s (target ≤ {TARGETS[key]} s: "
                       f"{_met(g['seconds'] <= TARGETS[key])})")  # fmt: skip
    e2e = res.get("e2e_triton", {})
    if "rel_err_logits" in e2e:
        out.append(f"tiny model, triton vs reference logits: relative error {e2e['rel_err_logits']:.2e} (tolerance "
                   f"{FP16_TOL}: {_met(e2e['ok'])})")  # fmt: skip
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(res: dict) -> str:
    env = res.get("environment", {})
    md = [f"# GPU check{' (CPU dry run: tiny shapes, Triton interpreter; no GPU figure)' if res['dry_run'] else ''}", "",
          f"{res['date']}; {env.get('gpu', 'CPU')}" + (f" ×{env['gpus']}, CUDA {env['cuda']}" if env.get("gpu") else "")
          + f"; torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}; llmq "
          f"{env.get('git')}; copy bandwidth {env.get('copy_GBps')} GB/s (measured).", "",
          "`python benchmarks/gpu_check.py" + (" --cpu-dry-run" if res["dry_run"] else "") + "` (its docstring says what "
          "each step does).", "", "## Steps", "", "| step | result | seconds |", "| --- | --- | ---: |"]  # fmt: skip
    for step, st in res["steps"].items():
        md.append(f"| {step} | {'ok' if st['ok'] else 'FAILED: ' + st.get('error', '')[:200].replace('|', '/')} | "
                  f"{st['seconds']} |")  # fmt: skip
    md += ["", "## Targets", ""] + [f"- {v}" for v in verdicts(res)]
    rows = res.get("kernel_timings", {}).get("rows", [])
    if rows:
        md += ["", "## Kernels", "", "| K × N | M | scheme | llmq µs | fp16 µs | torch int4 µs | × fp16 | × torch int4 | "
               "llmq GB/s | of copy BW | rel. err |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in rows:
            bw = f"{r['llmq_GBps'] / env['copy_GBps']:.0%}" if env.get("copy_GBps") else ""
            md.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['scheme']} | {r['llmq_us']} | {r['fp16_us']} | "
                      f"{r.get('torch_int4_us', '')} | {r['speedup_vs_fp16']} | {r.get('speedup_vs_torch_int4', '')} | "
                      f"{r['llmq_GBps']} | {bw} | {r['rel_err']:.1e} |")  # fmt: skip
    for name, g in res.get("gptq_layers", {}).items():
        if isinstance(g, dict) and "phases" in g:
            ph = ", ".join(f"{k} {v}" for k, v in g["phases"].items() if v >= 0.001)
            md += ["", f"GPTQ {name} ({g['calibration']} tokens): {g['seconds']} s; {ph}; {g['passes']} passes, "
                   f"{g['replays']} replays; peak GPU memory {g.get('peak_gpu_memory_gb', '-')} GB."]  # fmt: skip
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where gpu.json and gpu.md go")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU with tiny shapes")
    ap.add_argument("--steps", nargs="*", default=None, help="only these steps (default: all, in order)")
    ap.add_argument("--schemes", nargs="*", default=SCHEMES, help="kernel_timings' schemes")
    a = ap.parse_args()
    if a.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(REPO / "tests"))  # tests/tiny.py: the tiny models and their tokenizer
    import torch

    if not a.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr)
        return 2
    dev, sizes = ("cpu", DRY) if a.cpu_dry_run else ("cuda", GPU)
    steps = {
        "environment": lambda: environment(dev),
        "e2e_triton": lambda: e2e_triton(dev),
        "kernel_timings": lambda: kernel_timings(dev, sizes["shapes"], a.schemes, sizes["ms"]),
        "gptq_layers": lambda: gptq_layers(dev, sizes["layers"], sizes["calib"]),
        "torchrun": lambda: torchrun_step(dev, Path(tempfile.mkdtemp(prefix="llmq-gpu-check-"))),
        "kernel_tests": lambda: kernel_tests(dev, a.cpu_dry_run),
    }
    unknown = set(a.steps or ()) - set(steps)
    if unknown:
        ap.error(f"unknown step(s) {sorted(unknown)}; steps: {', '.join(steps)}")
    res: dict = {"dry_run": a.cpu_dry_run, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "steps": {}}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    for name, fn in steps.items():
        if a.steps and name not in a.steps:
            continue
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res[name] = fn()
            ok = res[name].get("ok", True)
            res["steps"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # recorded, and the next step runs: one GPU run must answer as much as it can
            res["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                                  "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
            print(res["steps"][name]["traceback"], file=sys.stderr, flush=True)
        (a.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (a.out / "gpu.md").write_text(markdown(res))
    return 0 if all(s["ok"] for s in res["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
