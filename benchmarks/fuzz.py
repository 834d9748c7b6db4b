"""Fuzz both loaders with thousands of mutated checkpoints (tests/fuzzing.py; tests/test_fuzz.py runs 300 in CI).

    python benchmarks/fuzz.py [--variants 5000] [--value-variants 5000] [--work /tmp/llmq-fuzz]

A tiny Llama quantized to asymmetric int4 g32 with 1% outliers, in several shards (every kind of llmq tensor:
qweight, scales, qzeros, the outliers' CSR, norms, embeddings). Each variant mutates one shard, seeded: its
safetensors header (dtype, shape, rank, data offsets, dropped / renamed / swapped entries, metadata, the length
field, flipped header bytes, garbage, a header that is no JSON object) or its tensor data (flipped bytes, truncation,
appended bytes, a zeroed range). Every variant goes through llmq.load_quantized and through transformers'
from_pretrained (verification on, the default); header variants also through from_pretrained with LLMQ_VERIFY=0,
where only the header checks stand between a mutation and the weights. A variant that takes longer than --timeout
seconds counts as a hang.

Value mutations (--value-variants; issue 37): one tensor's numbers changed (NaN, Inf, 0, negated, scaled, a flipped
bit, a value copied from elsewhere in the tensor, arbitrary bits) with the shard's sha256 recomputed in the index, so
only the value checks (llmq/verify.py) can tell. Two checkpoints, alternately: a tiny Qwen2 under GPTQ act-order with a
stored perm, asymmetric int4 g32, double-quantized scales and 1% outliers; the tiny Llama in Q4_0 blocks. Each loads
through both loaders with verification on (every fifth also with it off, to show what the checks stop), then runs a
forward pass: "nonfinite" is a model holding a NaN/Inf or giving one in its logits; "different" is one whose every
value is legal (a code moved within its grid, a norm's weight negated): what no check can tell from a real
checkpoint. Results: benchmarks/results/fuzz.md + fuzz.json.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, machine_line, write_results  # noqa: E402


class Hang(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=5000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-fuzz"))
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--value-variants", type=int, default=5000)
    a = ap.parse_args()
    import transformers
    from tiny import make_tiny, make_tokenizer
    from fuzzing import DATA_KINDS, HEADER_KINDS, load, outcome, state, value_checkpoints, value_variant, variant

    from llmq.cli import main as llmq_main

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    a.work.mkdir(parents=True, exist_ok=True)
    src, q = a.work / "src", a.work / "q"
    if not (q / "config.json").is_file():
        make_tiny("llama", vocab=300).save_pretrained(src)
        make_tokenizer(300).save_pretrained(src)
        assert llmq_main(["quantize", str(src), str(q), "--quiet", "--bits", "4", "--group-size", "32", "--outliers",
                          "0.01", "--max-shard-size", "40KB", "--overwrite"]) == 0  # fmt: skip
    refs = {loader: state(load(loader, q, True)) for loader in ("load_quantized", "from_pretrained")}

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    counts, by_kind, errors, bad = Counter(), Counter(), Counter(), []
    t0 = time.perf_counter()
    n_header = a.variants * 6 // 10
    for seed in range(a.variants):
        kinds = HEADER_KINDS if seed < n_header else DATA_KINDS
        d, kind = variant(q, a.work / "v", seed, kinds)
        for loader, ref in refs.items():
            for verify in (True, False) if kinds is HEADER_KINDS and loader == "from_pretrained" else (True,):
                signal.alarm(a.timeout)
                try:
                    res, detail = outcome(loader, d, verify, ref)
                except Hang:
                    res, detail = "hang", ""
                finally:
                    signal.alarm(0)
                counts[(loader, "verified" if verify else "LLMQ_VERIFY=0", res)] += 1
                by_kind[(kind, "verified" if verify else "LLMQ_VERIFY=0", res)] += 1
                if res == "error":
                    errors[error_kind(detail)] += 1
                if res in ("crash", "hang") or (res == "different" and verify):
                    bad.append({"seed": seed, "kind": kind, "loader": loader, "verify": verify, "result": res,
                                "detail": detail})  # fmt: skip
        if seed % 500 == 499:
            print(f"{seed + 1} variants, {time.perf_counter() - t0:.0f}s: {dict(counts)}", flush=True)
    secs = time.perf_counter() - t0
    values = fuzz_values(a, value_checkpoints(a.work, src), load, state, outcome, value_variant)
    report(a, counts, by_kind, errors, bad, secs, values)
    return 1 if bad or values["bad"] else 0


def fuzz_values(a, srcs, load, state, outcome, value_variant) -> dict:
    """The value mutations: counts per loader and verification, per mutation and tensor kind, refusals by kind."""
    refs = {(s, loader): state(load(loader, s, True)) for s in srcs for loader in ("load_quantized", "from_pretrained")}
    counts, by_kind, errors, bad = Counter(), Counter(), Counter(), []
    t0 = time.perf_counter()
    for seed in range(a.value_variants):
        src = srcs[seed % len(srcs)]
        d, kind, name = value_variant(src, a.work / "values", seed)
        last = name.split(".")
        part = ".".join(last[-2:]) if last[-1] in ("weight", "bias") else last[-1]  # e.g. q_proj.bias, scales
        for loader in ("load_quantized", "from_pretrained"):
            for verify in (True, False) if seed % 5 == 0 else (True,):
                signal.alarm(a.timeout)
                try:
                    res, detail = outcome(loader, d, verify, refs[(src, loader)])
                except Hang:
                    res, detail = "hang", ""
                finally:
                    signal.alarm(0)
                v = "verified" if verify else "LLMQ_VERIFY=0"
                counts[(loader, v, res)] += 1
                by_kind[(kind, part, v, res)] += 1
                if res == "error" and verify:
                    errors[error_kind(detail)] += 1
                if res in ("crash", "hang") or (res == "nonfinite" and verify):
                    bad.append({"seed": seed, "kind": kind, "tensor": name, "loader": loader, "verify": verify,
                                "result": res, "detail": detail})  # fmt: skip
        if seed % 500 == 499:
            print(f"{seed + 1} value variants, {time.perf_counter() - t0:.0f}s: {dict(counts)}", flush=True)
    return {"counts": counts, "by_kind": by_kind, "errors": errors, "bad": bad, "seconds": time.perf_counter() - t0}


def error_kind(detail: str) -> str:
    """The kind of a refusal, from its message."""
    kinds = {"field d": "llama.cpp block parameter not finite", "checksum mismatch": "shard checksum mismatch", "unreadable safetensors": "unreadable safetensors file",
             "config.json says": "full-precision tensor: dtype or shape differs from config.json",
             "missing tensor": "quantized part missing", "missing from the checkpoint": "tensor missing",
             "unexpected tensor": "unexpected tensor", ": dtype": "quantized part: wrong dtype",
             ": shape": "quantized part: wrong shape", "format version": "format version", "outlier_": "outlier "
             "index out of range", ".perm:": "not a permutation", "cannot read tensor": "tensor data unreadable",
             "expected a finite scale": "scale not finite, not positive or too large",
             "expected scales <=": "double-quant step too large",
             "expected a finite number": "value not finite", "row_part": "row_part: rows not in their pieces"}  # fmt: skip
    for key, kind in kinds.items():
        if key in detail:
            return kind
    return detail[:80]


def value_lines(a, values: dict) -> list[str]:
    c, bad = values["counts"], values["bad"]
    loads = sum(c.values())
    lines = ["", "## Value mutations with recomputed checksums", "",
             f"{a.value_variants:,} variants (seeds 0..{a.value_variants - 1}; tests/fuzzing.py `value_variant`), "
             f"{loads:,} loads and forward passes in {values['seconds']:.0f} s: **"
             f"{sum(1 for b in bad if b['result'] == 'crash')} crashes, {sum(1 for b in bad if b['result'] == 'hang')} "
             f"hangs, {sum(1 for b in bad if b['result'] == 'nonfinite')} loads of a model holding or computing a "
             "NaN/Inf** with verification on.", "",
             "| loader | verification | refused (LlmqError) | loaded, equal | loaded, legal values (no check can "
             "tell) | loaded, NaN/Inf | crash | hang |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for loader in ("load_quantized", "from_pretrained"):
        for v in ("verified", "LLMQ_VERIFY=0"):
            row = [c[(loader, v, r)] for r in ("error", "equal", "different", "nonfinite", "crash", "hang")]
            if sum(row):
                lines.append(f"| {loader} | {v} | " + " | ".join(f"{x:,}" for x in row) + " |")
    lines += ["", "LLMQ_VERIFY=0 runs on every fifth variant: what the value checks stop.", "",
              "Refusals by kind (verification on):", "", "| error | count |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in values["errors"].most_common()]
    lines += ["", "By mutation and tensor (verification on):", "", "| mutation | tensor | refused | equal | legal | NaN/Inf |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(k, t) for k, t, v, _ in values["by_kind"] if v == "verified"})
    for k, t in keys:
        n = [values["by_kind"][(k, t, "verified", r)] for r in ("error", "equal", "different", "nonfinite")]
        lines.append(f"| {k} | {t} | " + " | ".join(f"{x:,}" for x in n) + " |")
    return lines


def report(a, counts, by_kind, errors, bad, secs, values) -> None:
    m = machine()
    loads = sum(counts.values())
    lines = ["# Fuzzing the loaders", "", machine_line(m), "",
             f"{a.variants:,} mutated checkpoints (seeds 0..{a.variants - 1}; tests/fuzzing.py), {loads:,} loads in "
             f"{secs:.0f} s: **{sum(1 for b in bad if b['result'] == 'crash')} crashes, "
             f"{sum(1 for b in bad if b['result'] == 'hang')} hangs, "
             f"{sum(1 for b in bad if b['result'] == 'different')} loads of different weights** with verification "
             "on. `python benchmarks/fuzz.py`.", "",
             "| loader | verification | refused (LlmqError) | loaded, equal | loaded, different | crash | hang |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for loader in ("load_quantized", "from_pretrained"):
        for v in ("verified", "LLMQ_VERIFY=0"):
            row = [counts[(loader, v, r)] for r in ("error", "equal", "different", "crash", "hang")]
            if sum(row):
                lines.append(f"| {loader} | {v} | " + " | ".join(f"{x:,}" for x in row) + " |")
    lines += ["", "With LLMQ_VERIFY=0 the shard hashes are skipped; a header edit that points a tensor at other bytes "
              "of the same dtype and shape (e.g. two norms' offsets swapped) is then indistinguishable from a real "
              "checkpoint, which is what the checksums are for. Every other mutation is still refused there.", "",
              "Refusals by kind (verification on and off):", "", "| error | count |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:,} |" for k, v in errors.most_common()]
    lines += ["", "By mutation:", "", "| mutation | verification | result | count |", "|---|---|---|---|"]
    lines += [f"| {k} | {v} | {r} | {n:,} |" for (k, v, r), n in sorted(by_kind.items())]
    lines += value_lines(a, values)
    payload = {"machine": m, "variants": a.variants, "seconds": secs,
               "counts": {"/".join(k): v for k, v in counts.items()}, "errors": dict(errors),
               "by_kind": {"/".join(k): v for k, v in by_kind.items()}, "bad": bad,
               "values": {"variants": a.value_variants, "seconds": values["seconds"], "bad": values["bad"],
                          "counts": {"/".join(k): v for k, v in values["counts"].items()},
                          "errors": dict(values["errors"]),
                          "by_kind": {"/".join(k): v for k, v in values["by_kind"].items()}}}  # fmt: skip
    write_results("fuzz", payload, "\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    raise SystemExit(main())
