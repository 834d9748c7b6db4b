"""The per-rank memory, communication and time model of a distributed GPTQ conversion (docs/SCALE.md), and its check
against runs on this machine.

    python benchmarks/scale.py --measure [--dir /tmp/llmq-scale] [--nsamples 8] [--seqlen 512]
    python benchmarks/scale.py --render        # tables only, from the committed results

The model is the code below (`Shape`, `memory`, `comm_bytes`, `flops`): what llmq's pipeline and distributed.py
hold and send, term by term. --measure checks it against
  * SmolLM2 at 1 and 2 processes (benchmarks/results/distributed.json, from benchmarks/distributed.py): the
    communicated bytes per layer, and the time per layer from the calibrated CPU throughput;
  * one random-init decoder layer of Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 heads, 8 KV heads;
    SmolLM2's 49,152-token vocabulary), converted here with `torchrun --nproc-per-node 2` and with one process
    (one thread each, `nsamples` x `seqlen` tokens): peak RSS per rank, bytes per layer, seconds per phase.
    Larger shapes do not fit here with two ranks (70B's down_proj Hessian is 3.3 GB in fp32, three of them on its
    owner during the reduction, beside a 3.4 GB fp32 layer per rank, in 24 GB).
Then it projects Llama-3-8B, 70B and 405B on 8 GPUs of 80 and 141 GB (128 x 2048 calibration tokens) with
the stated throughputs: those are assumptions (no GPU measured here), the byte counts are not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
GB = 1e9


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv(self) -> int:  # k_proj / v_proj outputs
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """[R, C] of each linear of a decoder layer."""
        h, i, kv = self.hidden, self.inter, self.kv
        return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}

    @property
    def layer_params(self) -> int:
        return sum(r * c for r, c in self.linears().values()) + 2 * self.hidden


SMOLLM2 = Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152)
LLAMA3 = {
    "8B": Shape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "70B": Shape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256),
    "405B": Shape("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256),
}
# sequential groups and the Hessian (distinct input) each reads: q/k/v share one, gate/up share one
GROUPS = [("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",))]


def packed_bytes(R: int, C: int, bits: int = 4, group: int = 128) -> int:
    """int asym g128: codes + fp16 scales + packed zeros (docs/FORMAT.md)."""
    groups = -(-C // group)
    return R * C * bits // 8 + R * groups * 2 + R * groups * bits // 8


def owners(shape: Shape, W: int) -> dict[str, int]:
    """distributed.World.owners for one layer (fresh loads): the owner rank of each linear, group by group."""
    from llmq.algorithms.gptq import solve_cost
    from llmq.distributed import World

    w = World(rank=0, size=W)
    out = {}
    lin = shape.linears()
    for _, names in GROUPS:
        out |= w.owners({n: solve_cost(*lin[n]) for n in names})
    return out


def comm_bytes(shape: Shape, W: int, pickle_overhead: int = 0) -> dict[str, int]:
    """Bytes sent per decoder layer, all ranks together: every rank but the first owner sends its partial fp32 H
    to it, which forwards the sum to the other owners of the same H; then each quantized linear goes from its
    owner to the W - 1 others (plus pickling, per linear)."""
    if W == 1:
        return {"hessians": 0, "weights": 0, "total": 0}
    lin, own = shape.linears(), owners(shape, W)
    hess = weights = 0
    for _, names in GROUPS:
        C = lin[names[0]][1]
        d = len({own[n] for n in names})
        hess += (W - 1 + d - 1) * C * C * 4
        weights += sum((W - 1) * (packed_bytes(*lin[n]) + pickle_overhead) for n in names)
    return {"hessians": hess, "weights": weights, "total": hess + weights}


def memory(shape: Shape, W: int, tokens: int, seqlen: int, act_bytes: int = 4) -> dict[str, float]:
    """Peak bytes of one rank's working set (on its GPU with --device cuda; on the CPU here): the fp32 layer, the
    largest group's Hessians (a partial per rank; on the down_proj owner during the reduction its partial, the sum
    and a receive buffer, 3 C^2; a single process holds one H and the solve's one workspace), the calibration
    activations of its windows (inputs, the replayed blocks' recorded o_proj and down_proj inputs, the error
    reference), one window's transient MLP activations."""
    h, i = shape.hidden, shape.inter
    t = tokens / W
    layer = shape.layer_params * 4
    H = i * i * 4
    hess = (3 if W > 1 else 2) * H
    acts = (t * h + t * (h + i) + min(tokens, 2048) / W * h) * act_bytes
    window = seqlen * (3 * i + 4 * h) * act_bytes
    return {"layer": layer, "hessians": hess, "activations": acts, "window": window,
            "total": layer + hess + acts + window}  # fmt: skip


def flops(shape: Shape, W: int, tokens: int, seqlen: int) -> dict[str, float]:
    """Floating-point operations per layer on the busiest rank: forward passes (~1.1 full passes with the replay:
    linears 2 per weight per token, attention 4 L h per token), the Hessian products (upper block triangle: 0.56 of
    2 C^2 per token per distinct input) over its windows; the solves on the most loaded owner per group (Cholesky
    and inverse ~C^3, column loop ~2 R C^2)."""
    h, lin, own = shape.hidden, shape.linears(), owners(shape, W)
    t = tokens / W
    fwd = 1.1 * t * (2 * sum(r * c for r, c in lin.values()) + 4 * seqlen * h)
    hess = t * 0.56 * 2 * sum(lin[names[0]][1] ** 2 for _, names in GROUPS)
    solve = 0.0
    for _, names in GROUPS:
        per = [0.0] * W
        for n in names:
            R, C = lin[n]
            per[own[n]] += C**3 + 2 * R * C * C
        solve += max(per)
    return {"forward": fwd, "hessian": hess, "solve": solve}


# ---- measurements -----------------------------------------------------------------------------
def generate(d: Path, shape: Shape, layers: int = 1) -> Path:
    """A random-init checkpoint of `shape` (fp16, `layers` decoder layers) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if (d / "config.json").is_file():
        return d
    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, num_hidden_layers=layers, vocab_size=shape.vocab,
                      tie_word_embeddings=False, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(d)
    p = Path(default_model())
    AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(d)
    return d


def convert(model: Path, out: Path, procs: int, a) -> dict:
    launch = [sys.executable, "-m", "llmq"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", "29541",
        "-m", "llmq"]  # fmt: skip
    cmd = [*launch, "quantize", str(model), str(out), "--method", "gptq", "--calib", str(DATA), "--calib-split", "test",
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--quiet", "--overwrite"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                   cwd=tempfile.gettempdir())  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    ranks = (s.get("distributed") or {}).get("ranks") or [{"rank": 0, "peak_rss_mb": s["peak_rss_mb"]}]
    return {"procs": procs, "wall_s": round(time.perf_counter() - t, 1), "phases_s": s["phases_s"],
            "comm_bytes": s["layers"][0].get("comm_bytes", 0), "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
            "layer_s": s["layers"][0]["seconds"]}  # fmt: skip


def baseline_rss_mb() -> float:
    code = "import torch, transformers, llmq; from llmq.summary import peak_rss_mb; print(peak_rss_mb())"
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).strip().splitlines()[-1])


def measure(a) -> dict:
    shape = Shape("Llama-3-8B (1 layer)", 4096, 14336, 1, 32, 8, 49152)
    d = Path(a.dir)
    model = generate(d / "llama3-8b-1layer", shape)
    runs = {f"{n}p": convert(model, d / f"out-{n}p", n, a) for n in (2, 1)}
    return {"shape": shape.__dict__, "nsamples": a.nsamples, "seqlen": a.seqlen, "baseline_rss_mb": baseline_rss_mb(),
            "runs": runs}  # fmt: skip


# ---- tables -----------------------------------------------------------------------------------
DENSE = ("forward", "hessian", "error")  # phases the dense throughput covers
SOLVE = ("cholesky", "column_loop", "clip_search", "params")  # phases the solve throughput covers


def seconds(r: dict, phases: tuple[str, ...]) -> float:
    return sum(r["phases_s"].get(p, 0.0) for p in phases)


def check_rows(synthetic: dict, dist: dict) -> tuple[list[str], dict]:
    """Model against measurement. The two CPU throughputs are calibrated on the one-process runs (dense: SmolLM2's
    forward + Hessian + error phases; solve: the 8B layer's Cholesky + column loop + clip search + params phases);
    the two-process runs are then predicted: rank 0's seconds without read / write, waiting (comm) included."""
    lines = ["| run | quantity | model | measured |", "| --- | --- | ---: | ---: |"]
    s = dist["settings"]
    tokens = s["nsamples"] * s["seqlen"]
    f1 = flops(SMOLLM2, 1, tokens, s["seqlen"])
    theta = {"dense": SMOLLM2.layers * (f1["forward"] + f1["hessian"]) / seconds(dist["runs"]["1p"], DENSE)}
    sh = Shape(**synthetic["shape"]) if synthetic else None
    if synthetic:
        f8 = flops(sh, 1, synthetic["nsamples"] * synthetic["seqlen"], synthetic["seqlen"])
        theta["solve"] = f8["solve"] / seconds(synthetic["runs"]["1p"], SOLVE)
    else:
        theta["solve"] = SMOLLM2.layers * f1["solve"] / seconds(dist["runs"]["1p"], SOLVE)

    def predict(shape: Shape, W: int, tokens: int, seqlen: int) -> float:
        f = flops(shape, W, tokens, seqlen)
        return (f["forward"] + f["hessian"]) / theta["dense"] + f["solve"] / theta["solve"]

    for k, r in dist["runs"].items():
        W = r["procs"]
        per_layer = sum(r["comm_bytes_per_layer"]) / len(r["comm_bytes_per_layer"])
        if W > 1:
            c = comm_bytes(SMOLLM2, W)
            lines.append(f"| SmolLM2, {W} processes | bytes sent per layer (H + weights, no pickling) | "
                         f"{c['total'] / 1e6:.2f} MB | {per_layer / 1e6:.2f} MB |")  # fmt: skip
        pred = SMOLLM2.layers * predict(SMOLLM2, W, tokens, s["seqlen"])
        meas = seconds(r, DENSE + SOLVE + ("comm",))
        lines.append(f"| SmolLM2, {W} process{'es' if W > 1 else ''} | seconds, rank 0 (all but read / write) | "
                     f"{pred:.0f} s | {meas:.0f} s |")  # fmt: skip
    if synthetic:
        tokens = synthetic["nsamples"] * synthetic["seqlen"]
        base = synthetic["baseline_rss_mb"] * 2**20
        for k, r in synthetic["runs"].items():
            W = r["procs"]
            m = memory(sh, W, tokens, synthetic["seqlen"])
            lines.append(f"| 8B layer, {W} process{'es' if W > 1 else ''} | peak RSS per rank (baseline "
                         f"{synthetic['baseline_rss_mb']:.0f} MB + layer + H + activations + window) | "
                         f"{(base + m['total']) / 2**20:.0f} MB | {', '.join(f'{x:.0f}' for x in r['peak_rss_mb'])} MB |")  # fmt: skip
            if W > 1:
                c = comm_bytes(sh, W)
                lines.append(f"| 8B layer, {W} processes | bytes sent per layer | {c['total'] / 1e6:.1f} MB | "
                             f"{r['comm_bytes'] / 1e6:.1f} MB |")  # fmt: skip
            lines.append(f"| 8B layer, {W} process{'es' if W > 1 else ''} | seconds, rank 0 (all but read / write) | "
                         f"{predict(sh, W, tokens, synthetic['seqlen']):.0f} s | "
                         f"{seconds(r, DENSE + SOLVE + ('comm',)):.0f} s |")  # fmt: skip
    return lines, theta


def projection_rows(gpu_flops: float, solve_flops: float, link: float, net: float, disk: float) -> list[str]:
    lines = ["| model | GPUs | per-rank working set (layer + H + activations) | fits 80 GB / 141 GB | H bytes per "
             "layer (all ranks) | comm per layer, NVLink / network | read per layer | compute per layer | whole "
             "model (one node) |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    tokens, L = 128 * 2048, 2048
    for key, sh in LLAMA3.items():
        W = 8
        m = memory(sh, W, tokens, L, act_bytes=4)
        c = comm_bytes(sh, W)
        f = flops(sh, W, tokens, L)
        t_comp = (f["forward"] + f["hessian"]) / gpu_flops + f["solve"] / solve_flops
        # the reduction passes through the owner's link one partial at a time; a broadcast is about one copy's time
        t_link, t_net = (c["hessians"] / bw + c["weights"] / (W - 1) / bw for bw in (link, net))
        fits = " / ".join("yes" if m["total"] < cap * GB * 0.9 else "no" for cap in (80, 141))
        t_read = (shape_bytes := sh.layer_params * 2) / disk  # fp16 from disk once; the other ranks hit the page cache
        lines.append(f"| {sh.name} | {W} | {m['total'] / GB:.1f} GB ({m['layer'] / GB:.1f} + {m['hessians'] / GB:.1f} + "
                     f"{m['activations'] / GB:.1f}) | {fits} | {c['hessians'] / GB:.1f} GB | {t_link:.2f} s / "
                     f"{t_net:.1f} s | {t_read:.1f} s ({shape_bytes / GB:.1f} GB) | {t_comp:.1f} s | "
                     f"{sh.layers * (t_comp + t_link + t_read) / 60:.0f} min |")  # fmt: skip
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="run the synthetic 8B-layer conversions (minutes)")
    ap.add_argument("--render", action="store_true", help="only rebuild the tables from results/scale.json")
    ap.add_argument("--dir", default="/tmp/llmq-scale")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gpu-tflops", type=float, default=20.0,
                    help="assumed sustained fp32 TFLOP/s of one GPU on llmq's layer work (default 20: a third of an "
                         "H100's fp32 peak)")  # fmt: skip
    ap.add_argument("--gpu-solve-tflops", type=float, default=5.0,
                    help="assumed sustained TFLOP/s of the GPTQ solves on one GPU (default 5: Cholesky, triangular "
                         "inverse and the blocked column loop run far below peak)")  # fmt: skip
    ap.add_argument("--nvlink-gbps", type=float, default=150.0, help="assumed GB/s into one GPU within a node")
    ap.add_argument("--net-gbps", type=float, default=25.0, help="assumed GB/s into one GPU across nodes")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="assumed GB/s reading the source checkpoint")
    a = ap.parse_args()
    prev = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else {}
    synthetic = measure(a) if a.measure else prev.get("synthetic", {})
    dist = json.loads((RESULTS / "distributed.json").read_text())
    m = machine() if a.measure or not prev else prev["machine"]
    check, theta = check_rows(synthetic, dist)
    proj = projection_rows(a.gpu_tflops * 1e12, a.gpu_solve_tflops * 1e12, a.nvlink_gbps * GB, a.net_gbps * GB,
                           a.disk_gbps * GB)  # fmt: skip
    payload = {"machine": m, "synthetic": synthetic, "cpu_flops_per_s": theta,
               "assumptions": {"gpu_tflops": a.gpu_tflops, "gpu_solve_tflops": a.gpu_solve_tflops, "nvlink_gbps": a.nvlink_gbps, "net_gbps": a.net_gbps,
                               "disk_gbps": a.disk_gbps}}  # fmt: skip
    md = ["# Scale model: checked here, projected to Llama-3 8B / 70B / 405B", "", machine_line(m), "",
          "The model (benchmarks/scale.py) against runs on this machine (one thread per process). Its two CPU "
          "throughputs come from the one-process runs — dense (forward passes, Hessian products) "
          f"{theta['dense'] / 1e9:.0f} GFLOP/s from SmolLM2, solve (Cholesky + inverse ~C^3, column loop ~2RC^2, clip "
          f"search and parameters with them) {theta['solve'] / 1e9:.0f} GFLOP/s from the 8B layer — and predict the "
          "two-process runs:", "", *check, "",
          f"Projection: 8 GPUs, 128 x 2048 calibration tokens, fp32 layer work at an assumed {a.gpu_tflops:g} TFLOP/s "
          f"per GPU for the dense work and {a.gpu_solve_tflops:g} for the solves, {a.nvlink_gbps:g} GB/s into a GPU within a node, {a.net_gbps:g} GB/s across nodes, {a.disk_gbps:g} "
          "GB/s from disk (assumed, not measured: no GPU here); bytes and memory are counted, not assumed:", "", *proj,
          ""]  # fmt: skip
    for p in write_results("scale", payload, "\n".join(md) + "\n"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
