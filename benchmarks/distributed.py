"""GPTQ on one process and on two (torchrun, gloo), same settings, same machine, one run each.

    python benchmarks/distributed.py [--model PATH] [--nsamples 32] [--seqlen 2048] [--procs 1 2]
        [--eval-windows 40] [--flags "..."]

No extra venv: torchrun comes with torch. For each process count N, nothing else running:

    torchrun --nproc-per-node N -m llmq quantize MODEL OUT --method gptq --bits 4 --group-size 128 FLAGS
    (N = 1: plain `python -m llmq quantize`, no process group)

with OMP_NUM_THREADS = MKL_NUM_THREADS = 1 in every process (two processes on this machine's two cores). Measured:
wall seconds, CPU seconds (os.wait4's rusage of the launcher, its waited-for children included), per rank the peak
RSS and bytes sent (summary.json `distributed.ranks`), bytes communicated per layer (`layers[i].comm_bytes`, all
ranks together: each rank's partial Hessians to the owner, then each quantized weight from its owner to the others),
per-phase seconds (rank 0). Calibration: `nsamples` x `seqlen` tokens of WikiText-2 test drawn from its second half;
then both checkpoints are scored by `llmq eval` on the first `eval-windows` windows of 2048 tokens of the first half,
side by side, and their codes compared (what fraction of the packed code bytes differ: the two runs add the Hessian's
partial sums in different orders).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402
from gptq_speed import evaluate, timed_quantize  # noqa: E402


def quantize(model: str, out: Path, procs: int, a) -> dict:
    launch = [sys.executable, "-m", "llmq"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", "29533",
        "-m", "llmq"]  # fmt: skip
    wall, cpu, s = timed_quantize(launch, model, out, 1, a)
    comm = [r.get("comm_bytes", 0) for r in s["layers"]]
    dist = s.get("distributed") or {"world_size": 1, "ranks": [{"rank": 0, "windows": a.nsamples,
                                                                "peak_rss_mb": s["peak_rss_mb"], "comm_bytes": 0}]}  # fmt: skip
    r = {"procs": procs, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
         "quantize_time_s": s.get("quantize_time_s"), "load_time_s": s.get("load_time_s"),
         "phases_s": s.get("phases_s"), "comm_bytes_per_layer": comm, "ranks": dist["ranks"]}  # fmt: skip
    print(json.dumps({k: v for k, v in r.items() if k != "comm_bytes_per_layer"}), flush=True)
    return r


def code_difference(a: Path, b: Path) -> dict:
    """Packed code bytes (every `.qweight`) that differ between two checkpoints of the same tensors."""

    def codes(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("model-*.safetensors")):
            with safe_open(f, "pt") as h:
                out |= {k: h.get_tensor(k) for k in h.keys() if k.endswith("qweight")}
        return out

    ca, cb = codes(a), codes(b)
    if ca.keys() != cb.keys() or any(ca[k].shape != cb[k].shape or ca[k].dtype != cb[k].dtype for k in ca):
        raise SystemExit(f"{a} and {b} do not hold the same tensors")
    diff = sum(int((ca[k] != cb[k]).sum()) for k in ca)
    total = sum(ca[k].numel() for k in ca)
    return {"differing_bytes": diff, "bytes": total, "fraction": diff / total,
            "tensors_identical": sum(bool(torch.equal(ca[k], cb[k])) for k in ca), "tensors": len(ca)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--procs", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--flags", default="", help="recipe flags (default: llmq's defaults)")
    ap.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary dir)")
    ap.add_argument("--out", default="distributed")
    a = ap.parse_args()
    model = a.model or default_model()
    m = machine()
    work = Path(a.work or tempfile.mkdtemp(prefix="llmq-dist-"))
    runs = {f"{n}p": quantize(model, work / f"{n}p", n, a) for n in a.procs}
    outs = {k: work / k for k in runs}
    ppl = evaluate(outs, a) if a.eval_windows else {}
    first, *rest = list(runs)
    diff = {k: code_difference(work / first, work / k) for k in rest}
    payload = {"machine": m, "model": model, "settings": {"flags": a.flags, "bits": 4, "group_size": 128,
               "nsamples": a.nsamples, "seqlen": a.seqlen, "threads_per_process": 1}, "runs": runs,
               "perplexity": ppl, "code_difference_vs_" + first: diff}  # fmt: skip
    base = runs[first]
    lines = [f"# GPTQ on {' and '.join(map(str, a.procs))} processes (torchrun, gloo)", "", machine_line(m), "",
             f"`torchrun --nproc-per-node N -m llmq quantize {Path(model).name} OUT --method gptq --bits 4 "
             f"--group-size 128 {a.flags}` (N = 1: plain `python -m llmq`), {a.nsamples} x {a.seqlen} calibration "
             "tokens (WikiText-2 test, second half), one thread per process, each run alone on the machine. CPU = "
             "user + system seconds of the launcher and its workers. Communication: bytes sent between ranks per "
             "decoder layer, all ranks together.", "",
             "| processes | wall (s) | speedup | CPU (s) | quantize (s) | comm per layer (MB) | peak RSS per rank (MB) "
             "| windows per rank | perplexity |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]  # fmt: skip
    for k, r in runs.items():
        per_layer = sum(r["comm_bytes_per_layer"]) / max(len(r["comm_bytes_per_layer"]), 1) / 1e6
        rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        wins = ", ".join(str(x["windows"]) for x in r["ranks"])
        p = f"{ppl[k]['perplexity']:.4f}" if ppl else ""
        lines.append(f"| {r['procs']} | {r['wall_s']:.0f} | {base['wall_s'] / r['wall_s']:.2f}x | {r['cpu_s']:.0f} | "
                     f"{r['quantize_time_s']:.0f} | {per_layer:.1f} | {rss} | {wins} | {p} |")  # fmt: skip
    lines += ["", "Per phase, rank 0 (seconds over all layers, from summary.json; comm includes waiting for the "
              "other rank's solves):", "", "| processes | " + " | ".join(base["phases_s"]) + " | comm |",
              "| ---: |" + " ---: |" * (len(base["phases_s"]) + 1)]  # fmt: skip
    for r in runs.values():
        lines.append(f"| {r['procs']} | " + " | ".join(f"{r['phases_s'].get(p, 0):.1f}" for p in base["phases_s"])
                     + f" | {r['phases_s'].get('comm', 0):.1f} |")  # fmt: skip
    for k, d in diff.items():
        lines += ["", f"Codes, {k} against {first}: {d['differing_bytes']:,} of {d['bytes']:,} packed code bytes differ "
                  f"({100 * d['fraction']:.3f}%); {d['tensors_identical']} of {d['tensors']} code tensors identical."]  # fmt: skip
    if ppl:
        lines += ["", f"Perplexity: `llmq eval` on WikiText-2 test, first {a.eval_windows} windows of 2048 tokens of "
                  "the first half (no overlap with the calibration)."]  # fmt: skip
    for p in write_results(a.out, payload, "\n".join(lines) + "\n"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
