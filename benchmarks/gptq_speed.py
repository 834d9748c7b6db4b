"""GPTQ conversion time, this implementation beside the previous one, same settings, same machine, one run.

    python benchmarks/gptq_speed.py --baseline-python ../base-venv/bin/python [--model PATH] [--nsamples 32]
        [--seqlen 2048] [--threads 1 2] [--eval-windows 40] [--flags "--clip-search --gptq-inputs quantized"]

The previous implementation (the last commit before the GPTQ speed work, 8c85ba4) in its own venv:

    git worktree add ../llmq-base 8c85ba4
    python -m venv ../base-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > ../base-venv/lib/python3.11/site-packages/deps.pth
    ../base-venv/bin/pip install --no-deps -e ../llmq-base      # the same torch / transformers, the old llmq

For each thread count, `llmq quantize MODEL OUT --method gptq --bits 4 --group-size 128 FLAGS` runs with the
baseline's interpreter and with this one, one after the other, nothing else on the machine (OMP_NUM_THREADS =
MKL_NUM_THREADS = threads; cwd outside both checkouts, so `-m llmq` imports the installed llmq). Measured: wall
seconds and CPU seconds of the process (os.wait4's rusage: user + system), peak RSS and per-phase seconds from
summary.json. Calibration: `nsamples` x `seqlen` tokens of WikiText-2 test drawn from its second half
(--calib-range 0.5:1); both one-thread checkpoints are then scored by this llmq's `llmq eval` on the first
`eval-windows` windows of 2048 tokens of the same text (first half: no overlap with the calibration), side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"


def timed_quantize(launch: list[str], model: str, out: Path, threads: int, a) -> tuple[float, float, dict]:
    """`LAUNCH quantize MODEL OUT --method gptq --bits 4 --group-size 128 FLAGS` on the benchmark's calibration, with
    `threads` torch threads per process: (wall s, CPU s of the process and its waited-for children, summary.json)."""
    cmd = [*launch, "quantize", model, str(out), "--method", "gptq", "--bits", "4", "--group-size", "128",
           *shlex.split(a.flags), "--calib", str(DATA), "--calib-split", "test", "--calib-range", "0.5:1",
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--quiet", "--overwrite"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir())
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"quantize failed ({status}): {' '.join(cmd)}")
    return wall, ru.ru_utime + ru.ru_stime, json.loads((out / "summary.json").read_text())


def quantize(python: str, model: str, out: Path, threads: int, a) -> dict:
    wall, cpu, s = timed_quantize([python, "-m", "llmq"], model, out, threads, a)
    r = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": s.get("peak_rss_mb"),
         "quantize_time_s": s.get("quantize_time_s"), "phases_s": s.get("phases_s"),
         "passes_per_layer": [r.get("passes") for r in s["layers"]][:1], "llmq_version": s.get("llmq_version")}  # fmt: skip
    print(json.dumps(r), flush=True)
    return r


def evaluate(outs: dict[str, Path], a) -> dict[str, dict]:
    """`llmq eval` of every checkpoint, side by side (one process of one thread each)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for k, d in outs.items():
        cmd = [sys.executable, "-m", "llmq", "eval", str(d), "--dataset", str(DATA), "--max-windows",
               str(a.eval_windows), "--json", str(d / "eval.json"), "--quiet"]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        procs[k] = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir())
    res = {}
    for k, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"eval of {outs[k]} failed")
        e = json.loads((outs[k] / "eval.json").read_text())
        res[k] = {"perplexity": e["perplexity"], "tokens": e.get("tokens"), "protocol": e.get("protocol")}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-python", required=True, help="interpreter with the previous llmq installed")
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--flags", default="", help="recipe flags given to both (default: each one's own defaults)")
    ap.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary dir)")
    ap.add_argument("--out", default="gptq_speed")
    a = ap.parse_args()
    model = a.model or default_model()
    m = machine()
    base_rev = subprocess.run([a.baseline_python, "-c", "import llmq, pathlib; print(pathlib.Path(llmq.__file__).parents[1])"],
                              capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()  # fmt: skip
    base_git = subprocess.run(["git", "-C", base_rev, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    work = Path(a.work or tempfile.mkdtemp(prefix="llmq-speed-"))
    runs = {}
    for th in a.threads:
        for who, py in (("previous", a.baseline_python), ("this", sys.executable)):
            runs[f"{who}-{th}t"] = quantize(py, model, work / f"{who}-{th}t", th, a)
    outs = {k: work / k for k in runs if k.endswith(f"-{a.threads[0]}t")}
    ppl = evaluate(outs, a) if a.eval_windows else {}
    payload = {"machine": m, "model": model, "baseline": {"path": base_rev, "git": base_git},
               "settings": {"flags": a.flags, "bits": 4, "group_size": 128, "nsamples": a.nsamples,
                            "seqlen": a.seqlen}, "runs": runs, "perplexity": ppl}  # fmt: skip
    lines = [f"# GPTQ conversion time: this llmq ({m['git']}) beside the previous one ({base_git})", "",
             machine_line(m), "",
             f"`llmq quantize {Path(model).name} OUT --method gptq --bits 4 --group-size 128 {a.flags}` with "
             f"{a.nsamples} x {a.seqlen} calibration tokens (WikiText-2 test, second half); each run alone on the "
             "machine; CPU = user + system seconds of the process.", "",
             "| threads | implementation | wall (s) | CPU (s) | CPU vs previous | peak RSS (MB) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for th in a.threads:
        prev = runs[f"previous-{th}t"]
        for who in ("previous", "this"):
            r = runs[f"{who}-{th}t"]
            ratio = "" if who == "previous" else f"{prev['cpu_s'] / r['cpu_s']:.2f}x less"
            lines.append(f"| {th} | {who} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Per phase, this implementation (seconds over all layers, from summary.json):", "",
              "| threads | " + " | ".join(runs[f"this-{a.threads[0]}t"]["phases_s"]) + " | passes per layer |",
              "| ---: |" + " ---: |" * (len(runs[f"this-{a.threads[0]}t"]["phases_s"]) + 1)]  # fmt: skip
    for th in a.threads:
        r = runs[f"this-{th}t"]
        lines.append(f"| {th} | " + " | ".join(f"{v:.1f}" for v in r["phases_s"].values())
                     + f" | {r['passes_per_layer'][0]} |")  # fmt: skip
    if ppl:
        k0, k1 = f"previous-{a.threads[0]}t", f"this-{a.threads[0]}t"
        p0, p1 = ppl[k0]["perplexity"], ppl[k1]["perplexity"]
        lines += ["", f"Perplexity (`llmq eval`, WikiText-2 test, first {a.eval_windows} windows of 2048 tokens, the "
                  f"first half of the text: no overlap with the calibration): previous {p0:.4f}, this {p1:.4f} "
                  f"({100 * (p1 / p0 - 1):+.2f}%)."]  # fmt: skip
    for p in write_results(a.out, payload, "\n".join(lines) + "\n"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
