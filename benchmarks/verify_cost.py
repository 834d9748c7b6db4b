"""What verifying a checkpoint costs on load: every loader (from_pretrained after `import llmq`, llmq.load_quantized,
llmq inspect / eval / export) hashes each shard against the sha256 in the index before any tensor is read, and checks
the values no checksum can judge (llmq/verify.py) once they are read.

    python benchmarks/verify_cost.py [--dir /tmp/llmq-mem] [--layers 56]

Measured, alone on the machine: sha256 throughput over the 6.2 GB fp16 synthetic checkpoint of benchmarks/memory.py
(generated once, not committed: hashing a checkpoint of that size), then load time with verification on and off
(LLMQ_VERIFY=0 / verify=False) of two llmq checkpoints: SmolLM2 RTN int4 g128, and the RTN int4 g128 conversion of
that synthetic model. Each load runs in a fresh process (a second run of the same files: the page cache is warm, so
the figures are hashing cost, not disk speed). Results: benchmarks/results/verify_cost.md + .json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402
from memory import generate  # noqa: E402

LOAD = """
import sys, time
import llmq
from llmq import codec, nn, record, verify
from llmq.checkpoint import CheckpointReader
d = sys.argv[1]
CheckpointReader(d, verify=False)  # the shards' headers, once, so that both timings below start alike
t0 = time.perf_counter()
CheckpointReader(d, verify=True)  # what every loader runs first: each shard hashed against the index
t1 = time.perf_counter()
model = llmq.load_quantized(d, verify=False)
t2 = time.perf_counter()
# what the loaders add once the tensors are in: every quantized module's values, then every float tensor
for name, m in model.named_modules():
    if isinstance(m, (nn.QuantLinear, nn.RowSplitLinear)) and not name.count(".pieces."):
        m.quantized_weight().check_values(name, values=True)
verify.model_tensors(model.state_dict())
t3 = time.perf_counter()
codec.verify_values(CheckpointReader(d), record.read(d)[1])  # inspect's and export's: read from the shards
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def load_seconds(d: Path, reps: int = 3) -> tuple[float, ...]:
    """(hashing every shard against the index, the rest of the load, the value checks on the loaded model, the value
    checks read from the shards), medians of `reps` fresh processes."""
    import statistics

    runs = []
    for _ in range(reps):
        r = subprocess.run([sys.executable, "-c", LOAD, str(d)], capture_output=True, text=True, check=True)
        runs.append(tuple(float(x) for x in r.stdout.strip().splitlines()[-1].split()))
    return tuple(statistics.median(run[i] for run in runs) for i in range(4))


def hash_seconds(files: list[Path]) -> float:
    from llmq.checkpoint import sha256_file

    for f in files:  # warm the page cache: the hashing, not the disk, is measured
        f.read_bytes()
    t0 = time.perf_counter()
    for f in files:
        sha256_file(f)
    return time.perf_counter() - t0


def quantized(src: str, out: Path) -> Path:
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llmq", "quantize", src, str(out), "--bits", "4", "--quiet",
                        "--overwrite"], check=True)  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmq-mem"))
    ap.add_argument("--layers", type=int, default=56)
    a = ap.parse_args()
    synth = a.dir / "model"
    generate(synth, a.layers)
    shards = sorted(synth.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in shards)
    secs = hash_seconds(shards)
    rows = []
    for name, src, out in (("SmolLM2-135M RTN int4 g128", default_model(), a.dir / "smollm2-q"),
                           (f"synthetic {a.layers}-layer RTN int4 g128", str(synth), a.dir / "synth-q")):  # fmt: skip
        q = quantized(src, out)
        size = sum(f.stat().st_size for f in q.glob("model*.safetensors"))
        verify, rest, values, values_read = load_seconds(q)
        rows.append({"checkpoint": name, "bytes": size, "verify_s": verify, "load_s": rest, "values_s": values,
                     "values_read_s": values_read})  # fmt: skip
    m = machine()
    lines = ["# Cost of verifying a checkpoint on load", "", machine_line(m), "",
             f"sha256 of the {nbytes / 1e9:.2f} GB synthetic checkpoint (benchmarks/memory.py, {a.layers} layers, page "
             f"cache warm): {secs:.1f} s = {nbytes / 1e9 / secs:.2f} GB/s on one core.", "",
             "| llmq checkpoint | shards | verification (sha256 of every shard) | rest of the load | share | value "
             "checks, loaded model | value checks, from the shards | value checks / hashing |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['bytes'] / 1e9:.2f} GB | {r['verify_s']:.2f} s | {r['load_s']:.2f} s | "
                     f"{100 * r['verify_s'] / (r['verify_s'] + r['load_s']):.0f}% | {r['values_s']:.3f} s | "
                     f"{r['values_read_s']:.3f} s | {100 * r['values_s'] / r['verify_s']:.0f}% / "
                     f"{100 * r['values_read_s'] / r['verify_s']:.0f}% |")  # fmt: skip
    lines += ["", "Each row: medians of 3 fresh processes (after `import llmq`), page cache warm; verification is "
              "`CheckpointReader(dir, verify=True)`, which both loaders run before reading any tensor; the rest is "
              "`llmq.load_quantized(dir, verify=False)` (from_pretrained, repacking for the CPU backend). At the "
              f"measured hashing speed a 100 GB checkpoint costs about {100 / (nbytes / 1e9 / secs):.0f} s of "
              "verification per load (more when the files are read from disk for the first time: the hashing reads "
              "them once). `LLMQ_VERIFY=0` (or `load_quantized(verify=False)`, `llmq inspect --no-verify`) skips "
              "the hashing and the value checks, not the header, dtype, shape and index checks.", "",
              "Value checks (llmq/verify.py; issue 37's target: at most 25% of the hashing's time): on the loaded model, "
              "what from_pretrained and load_quantized add after the tensors are in (every quantized module's scales, "
              "outliers and indices, then every float tensor: norms, embeddings, head, in the model's dtype, float32 "
              "here); from the shards, what `llmq inspect` and `llmq export` run (the same checks, each shard's "
              "scales and full-precision tensors read from the page cache, the codes not read).", ""]  # fmt: skip
    write_results("verify_cost", {"machine": m, "hash": {"bytes": nbytes, "seconds": secs}, "loads": rows},
                  "\n".join(lines))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
