"""The new families' exports run by the engines: every family llmq writes as GGUF in llama.cpp, and a Qwen3
compressed-tensors export in vLLM's CPU build, each against llmq running its own checkpoint (issue 34).

Three steps; vLLM pins its own torch and runs in a venv of its own:

    # 1. in llmq's venv (the README's), with llama.cpp built as benchmarks/gguf_bench.py's docstring says (GGML_NATIVE=OFF
    #    and -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    #    -DGGML_AMX_BF16=OFF on a machine whose AMX the build would otherwise pick up):
    python benchmarks/families_engines.py llama-cpp --llama-cpp .../llama.cpp/build/bin [--work /tmp/llmq-engines]
    python benchmarks/families_engines.py prepare-vllm [--work /tmp/llmq-engines]
    # 2. in the vLLM venv (benchmarks/interop.py's docstring makes it):
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/families_engines.py vllm [--work /tmp/llmq-engines]
    # 3. back in llmq's venv: benchmarks/results/families-engines.{json,md}, and the section in families.md
    python benchmarks/families_engines.py report [--work /tmp/llmq-engines]

The models: each family's transformers config class with 4 layers, hidden 256, intermediate 512, 4 heads of 64 (2 kv
heads), a 16-token sliding window where the family has one (so windows bite at context 64), Granite's four
multipliers set away from 1, random weights with initializer_range 0.08 (next-token distributions far from uniform, yet
not so chaotic that int4 noise scrambles them), the byte-level BPE tokenizer of tests/tiny.py. llama is there as the
control: its export was checked on SmolLM2 (results/gguf.md).

llama.cpp: `llmq quantize --gguf-recipe Q4_K_M` (RTN), `llmq export --to gguf --gguf-embedding-type f32` (embeddings and
head as llmq holds them: the comparison is of the quantized linears, not of the head's Q6_K), then `llama-perplexity -c
64 --chunks 8 --kl-divergence-base` writes the log-probabilities of every scored position (the second half of each
64-token chunk, 16-bit: a step of at most 16/65535 in log-prob) with the tokens it scored; llmq's own checkpoint
(`load_quantized`, reference backend, float32) scores the same tokens. Reported: the largest and mean |log-prob
difference| over all positions and the whole vocabulary, the top-1 agreement, both perplexities; beside them, the same
numbers for llmq's quantized model against the unquantized one: what quantization changes, the scale an engine error
would have to hide under. llama.cpp's CPU matmuls round activations to 8 bits (Q8_K), so agreement is that close, not
exact.

vLLM: Qwen3 of the same shapes, `llmq quantize --bits 4 --group-size 64 --sym` (vLLM's CPU W4A16 path), `llmq export
--to compressed-tensors`, loaded by `vllm.LLM(dtype="float16")`; prompt log-probs of 4 windows of 64 tokens against
llmq's (float32).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CTX, CHUNKS = 64, 8
SHAPE = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)  # fmt: skip
OWN = {  # what sets each family apart, at these shapes; llama: the control (its export was checked on SmolLM2)
    "llama": {},
    "qwen3": dict(head_dim=64),
    "gemma2": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=16),
    "gemma3_text": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "phi3": dict(pad_token_id=0),
    "olmo2": dict(pad_token_id=0),
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.25, logits_scaling=8.0,
                    attention_multiplier=0.125),
    "smollm3": dict(pad_token_id=0),
}  # fmt: skip
VOCAB = 300


def sh(cmd: list, log: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({log}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout + r.stderr


def make(d: Path, model_type: str, init: float) -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    from tiny import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, initializer_range=init, **(SHAPE | OWN[model_type]))
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        make_tokenizer(VOCAB).save_pretrained(d)
    return d


def read_kl_base(path: Path) -> tuple[list[int], "torch.Tensor"]:  # noqa: F821
    """llama-perplexity's --kl-divergence-base file: ("_logits_", n_ctx, n_vocab, n_chunk, the tokens, then per scored
    position: float scale, float min log-prob, n_vocab uint16 steps padded to nv = 2*ceil(n_vocab/2) + 4 halves).
    Returns the tokens and the log-probs [n_chunk, n_ctx - 1 - n_ctx/2, n_vocab]."""
    import numpy as np
    import torch

    b = path.read_bytes()
    assert b[:8] == b"_logits_", path
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", b, 8)
    off = 20
    tokens = np.frombuffer(b, dtype=np.int32, count=n_chunk * n_ctx, offset=off).tolist()
    off += 4 * n_chunk * n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_pos = n_ctx - 1 - n_ctx // 2
    raw = np.frombuffer(b, dtype=np.uint16, count=n_chunk * n_pos * nv, offset=off).reshape(n_chunk, n_pos, nv)
    head = raw[..., :4].copy().view(np.float32)  # scale, min log-prob
    steps = raw[..., 4 : 4 + n_vocab].astype(np.float64)
    logp = head[..., 1:2].astype(np.float64) + head[..., 0:1].astype(np.float64) * steps
    return tokens, torch.from_numpy(logp)


def log_probs(model, tokens: list[int], n_ctx: int) -> "torch.Tensor":  # noqa: F821
    """llama-perplexity's protocol in torch: each n_ctx chunk scored on its second half (positions n_ctx/2 .. -2)."""
    import torch

    x = torch.tensor(tokens).view(-1, n_ctx)
    with torch.no_grad():
        return torch.log_softmax(model(x).logits.double(), -1)[:, n_ctx // 2 : n_ctx - 1]


def compare(a, b, tokens: list[int], n_ctx: int) -> dict:
    import torch

    tgt = torch.tensor(tokens).view(-1, n_ctx)[:, n_ctx // 2 + 1 :]
    d = (a - b).abs()
    # llama.cpp floors log-probs more than 16 below the top one at that floor: compare where both are above it
    live = (a > a.amax(-1, keepdim=True) - 15.9) & (b > b.amax(-1, keepdim=True) - 15.9)
    ppl = [math.exp(-x.gather(-1, tgt.unsqueeze(-1)).mean().item()) for x in (a, b)]
    return {"max_abs_logp_diff": float(d[live].max()), "mean_abs_logp_diff": float(d[live].mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()), "ppl": ppl,
            "positions": int(tgt.numel())}  # fmt: skip


def llama_cpp(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import llmq
    from llmq.gguf_names import FAMILIES

    torch.set_num_threads(2)
    work, bin_ = Path(a.work), Path(a.llama_cpp)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import SAMPLE_TEXT

    (work / "text.txt").parent.mkdir(parents=True, exist_ok=True)
    (work / "text.txt").write_text(SAMPLE_TEXT * 2)
    rows = {}
    for mt in a.families:
        w = work / mt
        w.mkdir(parents=True, exist_ok=True)
        src = make(w / "src", mt, a.init)
        q = w / "q"
        if not (q / "config.json").is_file():
            sh([sys.executable, "-m", "llmq", "quantize", src, q, "--gguf-recipe", "Q4_K_M", "--quiet", "--overwrite"],
               w / "quantize.log")  # fmt: skip
        g = w / "model.gguf"
        if not g.is_file():
            sh([sys.executable, "-m", "llmq", "export", q, g, "--to", "gguf", "--gguf-embedding-type", "f32",
                "--quiet"], w / "export.log")  # fmt: skip
        t0 = time.perf_counter()
        out = sh([bin_ / "llama-perplexity", "-m", g, "-f", work / "text.txt", "-c", CTX, "--chunks", CHUNKS, "-b", CTX,
                  "-t", 2, "--kl-divergence-base", w / "logits.bin"], w / "perplexity.log")  # fmt: skip
        secs = time.perf_counter() - t0
        tokens, theirs = read_kl_base(w / "logits.bin")
        ours = log_probs(llmq.load_quantized(q, backend="reference"), tokens, CTX)
        fp = log_probs(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tokens, CTX)
        ppl_line = next((ln for ln in out.splitlines() if "Final estimate" in ln), "")
        rows[mt] = {"gguf_arch": FAMILIES[mt].arch, "llama_cpp_vs_llmq": compare(theirs, ours, tokens, CTX),
                    "llmq_vs_unquantized": compare(ours, fp, tokens, CTX), "llama_perplexity_line": ppl_line.strip(),
                    "gguf_bytes": g.stat().st_size, "llama_cpp_seconds": round(secs, 2)}
        print(mt, json.dumps(rows[mt]), flush=True)
    (work / "llama_cpp.json").write_text(json.dumps(rows, indent=2) + "\n")


def prepare_vllm(a) -> None:
    import torch
    from safetensors.torch import save_file

    import llmq

    torch.set_num_threads(2)
    work = Path(a.work) / "vllm"
    work.mkdir(parents=True, exist_ok=True)
    src = make(work / "src", "qwen3", a.init)
    q, ct = work / "q", work / "qwen3.compressed-tensors"
    if not (q / "config.json").is_file():
        sh([sys.executable, "-m", "llmq", "quantize", src, q, "--bits", "4", "--group-size", "64", "--sym", "--quiet",
            "--overwrite"], work / "quantize.log")  # fmt: skip
    if not (ct / "config.json").is_file():
        sh([sys.executable, "-m", "llmq", "export", q, ct, "--to", "compressed-tensors", "--quiet"],
           work / "export.log")  # fmt: skip
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(0))
    fp_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ours = torch.log_softmax(llmq.load_quantized(q, backend="reference")(tokens).logits.double(), -1)
        fp = torch.log_softmax(fp_model(tokens).logits.double(), -1)
    save_file({"tokens": tokens, "llmq_logp": ours.float()}, str(work / "windows.safetensors"))
    d = (ours - fp)[:, :-1].abs()
    (work / "prepare.json").write_text(json.dumps({"llmq_vs_unquantized": {
        "max_abs_logp_diff": float(d.max()), "mean_abs_logp_diff": float(d.mean()),
        "top1_agreement": float((ours.argmax(-1) == fp.argmax(-1))[:, :-1].double().mean())}}) + "\n")


def vllm_part(a) -> None:
    """Runs in the vLLM venv: no llmq import."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernel_speed.py shadows `kernels`
    import torch
    import vllm
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = Path(a.work) / "vllm"
    t = load_file(str(work / "windows.safetensors"))
    t0 = time.perf_counter()
    llm = LLM(model=str(work / "qwen3.compressed-tensors"), dtype="float16", enforce_eager=True, max_model_len=CTX + 1,
              max_logprobs=VOCAB, seed=0)  # fmt: skip
    load = time.perf_counter() - t0
    res = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in t["tokens"]],
                       SamplingParams(max_tokens=1, prompt_logprobs=VOCAB), use_tqdm=False)  # fmt: skip
    theirs = torch.full(t["llmq_logp"].shape, float("nan"), dtype=torch.float64)
    for i, r in enumerate(res):
        for p, lp in enumerate(r.prompt_logprobs):
            if lp is None:
                continue
            for tok, v in lp.items():  # the log-prob after position p - 1 of token tok
                theirs[i, p - 1, tok] = v.logprob
    ours = t["llmq_logp"].double()
    body = theirs[:, :-1]
    d = (body - ours[:, :-1]).abs()
    ok = ~torch.isnan(d)
    out = {"vllm": vllm.__version__, "torch": torch.__version__, "load_s": round(load, 2),
           "max_abs_logp_diff": float(d[ok].max()), "mean_abs_logp_diff": float(d[ok].mean()),
           "compared": int(ok.sum()), "top1_agreement": float((body.nan_to_num(-1e9).argmax(-1) ==
                                                                ours[:, :-1].argmax(-1)).double().mean())}  # fmt: skip
    print(out, flush=True)
    (work / "vllm.json").write_text(json.dumps(out, indent=2) + "\n")


def report(a) -> None:
    sys.path.insert(0, str(HERE))
    from common import machine, machine_line, write_results

    work = Path(a.work)
    lc = json.loads((work / "llama_cpp.json").read_text())
    vp = work / "vllm" / "vllm.json"
    vl = json.loads(vp.read_text()) if vp.is_file() else None
    if vl:
        vl["llmq_vs_unquantized"] = json.loads((work / "vllm" / "prepare.json").read_text())["llmq_vs_unquantized"]
    m = machine()
    md = ["## The families in the engines", "", machine_line(m), "",
          "`python benchmarks/families_engines.py` (its docstring: models, protocol). llama.cpp built from the "
          "llama-cpp-python 0.3.36 sdist; tiny models of each family's config class (4 layers, hidden 256, 4 heads of "
          "64, sliding window 16 where the family has one), Q4_K_M by RTN, exported by `llmq export --to gguf "
          "--gguf-embedding-type f32` (llama.cpp then differs from llmq only in how it computes); "
          f"{CHUNKS} chunks of {CTX} tokens, second halves scored (llama-perplexity's protocol), all {VOCAB} log-probs "
          "of every scored position compared.", "",
          "| family | GGUF arch | llama.cpp vs llmq: max / mean abs Δ log-prob | top-1 agree | ppl llama.cpp / llmq | "
          "llmq Q4_K_M vs unquantized: max / mean abs Δ | top-1 agree |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mt, r in lc.items():
        e, q = r["llama_cpp_vs_llmq"], r["llmq_vs_unquantized"]
        md.append(f"| {mt} | {r['gguf_arch']} | {e['max_abs_logp_diff']:.4f} / {e['mean_abs_logp_diff']:.5f} | "
                  f"{e['top1_agreement']:.3f} | {e['ppl'][0]:.3f} / {e['ppl'][1]:.3f} | {q['max_abs_logp_diff']:.4f} / "
                  f"{q['mean_abs_logp_diff']:.5f} | {q['top1_agreement']:.3f} |")  # fmt: skip
    if vl:
        md += ["", f"vLLM {vl['vllm']} (CPU build, torch {vl['torch']}, its own venv): the tiny Qwen3 of the same "
               "shapes as int4 sym g64 compressed-tensors (`llmq export --to compressed-tensors`), float16: loaded in "
               f"{vl['load_s']} s; its prompt log-probs against llmq's (float32) over {vl['compared']} (position, "
               f"token) pairs: max |Δ| {vl['max_abs_logp_diff']:.4f}, mean {vl['mean_abs_logp_diff']:.5f}, "
               "top-1 agreement "
               f"{vl['top1_agreement']:.3f}; for scale, llmq's int4 model against the unquantized one: max |Δ| "
               f"{vl['llmq_vs_unquantized']['max_abs_logp_diff']:.4f}, mean "
               f"{vl['llmq_vs_unquantized']['mean_abs_logp_diff']:.5f}, top-1 agreement "
               f"{vl['llmq_vs_unquantized']['top1_agreement']:.3f}."]  # fmt: skip
    write_results("families-engines", {"machine": m, "llama_cpp": lc, "vllm": vl}, "\n".join(md) + "\n")
    fam = HERE / "results" / "families.md"
    text = fam.read_text()
    mark = "<!-- engines: benchmarks/families_engines.py report -->"
    text = text.split(mark)[0].rstrip() + "\n\n" + mark + "\n" + "\n".join(md) + "\n"
    fam.write_text(text)
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["llama-cpp", "prepare-vllm", "vllm", "report"])
    ap.add_argument("--work", default="/tmp/llmq-engines")
    ap.add_argument("--llama-cpp", help="llama.cpp's build/bin")
    ap.add_argument("--families", nargs="*", default=list(OWN))
    ap.add_argument("--init", type=float, default=0.08, help="initializer_range of the random weights")
    a = ap.parse_args()
    {"llama-cpp": llama_cpp, "prepare-vllm": prepare_vllm, "vllm": vllm_part, "report": report}[a.step](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
