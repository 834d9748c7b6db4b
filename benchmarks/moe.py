"""Mixtures of experts on real weights without a real MoE on this machine (issue 35): SmolLM2-135M upcycled into a
Mixtral-shaped model, quantized expert by expert, against dense SmolLM2 quantized the same way; the expert policies
side by side; the GGUF export in llama.cpp; vLLM's CPU build on the compressed-tensors export.

    # in llmq's venv (the README's); llama.cpp built as benchmarks/gguf_bench.py's docstring says
    python benchmarks/moe.py build            [--work /tmp/llmq-moe]   # the three model dirs (~3 GB)
    python benchmarks/moe.py quality          [--work ...]             # dense vs upcycled, GPTQ int4 / int3 g64
    python benchmarks/moe.py policies         [--work ...]             # --expert-policy on the perturbed upcycle
    python benchmarks/moe.py llama-cpp --llama-cpp .../llama.cpp/build/bin [--work ...]
    python benchmarks/moe.py prepare-vllm     [--work ...]
    # in the vLLM venv (benchmarks/interop.py's docstring makes it):
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/moe.py vllm [--work ...]
    python benchmarks/moe.py report           [--work ...]             # results/moe.{json,md}

The models (`build`), all from the SmolLM2-135M-Instruct GGUF (dequantized Q4_1, float32), saved as Hugging Face dirs
with its tokenizer:
  dense      SmolLM2 itself (llama);
  upcycled   Mixtral-shaped: 8 experts, top 2, every expert a copy of SmolLM2's MLP, a random router (N(0, 1/H)).
             With identical experts and top-k weights summing to 1 its output is SmolLM2's (checked: logits within
             fp32 rounding); each expert sees about a quarter of the calibration tokens;
  perturbed  the upcycle with 5% of each expert's intermediate neurons re-drawn (their gate/up rows and down column,
             Gaussian of the tensor's std; a different 5% per expert, so experts get different codes), and a router
             biased against experts 5, 6, 7 (each layer's router row e gets c_e times the mean direction of that layer's
             MoE inputs on 8 x 512 tokens of WikiText-2 test's second half, c = 0, 0, 0, 0, 0, -1.5, -3, -5):
             experts 6 and 7 are rarely routed, so the policy for rarely routed experts matters.

Protocol: WikiText-2 test, calibration 64 x 512 tokens (seed 0) from the second half of the token stream
(`--calib-range 0.5:1`), perplexity `llmq eval` on the first 20 windows of 2048 (no overlap with calibration). Each
run is `llmq quantize` (streaming, as a user runs it) as a process of its own with OMP_NUM_THREADS=2, one at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKI = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw"
CALIB = ["--calib", str(WIKI), "--calib-split", "test", "--calib-range", "0.5:1", "--nsamples", "64", "--seqlen", "512"]
EVAL_WINDOWS = 20
POLICY_WINDOWS = 10  # the policies, compared among themselves on the perturbed model: the first 10 of those windows
POLICY_CALIB = ["--nsamples", "32", "--seqlen", "256"]  # and 32 x 256 calibration tokens (the rare experts rarer)
POLICY_LAYERS = 8  # on the perturbed upcycle's first 8 layers
N_EXPERTS, TOP_K = 8, 2
BIAS = [0.0, 0.0, 0.0, 0.0, 0.0, -1.5, -3.0, -5.0]


def _benchmarks_path() -> None:
    """benchmarks/ on sys.path for common.py and families_engines.py; not at import: vLLM's engine process re-imports
    this file, and benchmarks/kernel_speed.py would shadow the `kernels` package it imports."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


def sh(cmd: list, log: Path, env: dict | None = None) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({log}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout + r.stderr, time.perf_counter() - t0


# ---- build -----------------------------------------------------------------------------------------------------
def mixtral_config(c, **over):
    from transformers import MixtralConfig

    rope = dict(getattr(c, "rope_parameters", None) or {}) or {"rope_type": "default", "rope_theta": c.rope_theta}
    return MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                         rope_parameters=rope, tie_word_embeddings=c.tie_word_embeddings, sliding_window=None,
                         num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K, bos_token_id=c.bos_token_id,
                         eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
                         router_jitter_noise=0.0, **over)  # fmt: skip


def upcycle(dense, perturb: bool, mean_dirs=None, seed: int = 0):
    """A Mixtral holding `dense`'s attention, norms and embeddings and N_EXPERTS copies of each layer's MLP."""
    import torch
    from transformers import MixtralForCausalLM

    g = torch.Generator().manual_seed(seed)
    m = MixtralForCausalLM(mixtral_config(dense.config)).eval()
    src = dense.state_dict()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mlp." not in n:
                p.copy_(src[n])
        H, I = dense.config.hidden_size, dense.config.intermediate_size
        for i, (layer, dl) in enumerate(zip(m.model.layers, dense.model.layers)):
            gate, up, down = dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight, dl.mlp.down_proj.weight
            ex = layer.mlp.experts
            for e in range(N_EXPERTS):
                G, U, D = gate.clone(), up.clone(), down.clone()
                if perturb:  # 5% of this expert's neurons re-drawn
                    j = torch.randperm(I, generator=g)[: I // 20]
                    G[j] = torch.randn(len(j), H, generator=g) * gate.std()
                    U[j] = torch.randn(len(j), H, generator=g) * up.std()
                    D[:, j] = torch.randn(H, len(j), generator=g) * down.std()
                ex.gate_up_proj[e].copy_(torch.cat([G, U]))
                ex.down_proj[e].copy_(D)
            W = torch.randn(N_EXPERTS, H, generator=g) / math.sqrt(H)
            if mean_dirs is not None:
                u = mean_dirs[i]
                W += torch.tensor(BIAS)[:, None] * (u / u.square().sum())[None, :]
            layer.mlp.gate.weight.copy_(W)
    return m


def build(a) -> None:
    _benchmarks_path()
    import torch
    from common import default_model

    from llmq import sources
    from llmq.calibration import tokenize_text
    from llmq.data import load_text

    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = sources.resolve(default_model())
    loaded, _ = sources.load_model(src)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):  # the GGUF loader's marker: this copy is a plain float model
        del cfg.quantization_config
    dense = type(loaded)(cfg).eval()
    dense.load_state_dict(loaded.state_dict())
    del loaded
    tok, _ = sources.load_tokenizer(src)
    if not (work / "dense" / "config.json").is_file():
        dense.save_pretrained(work / "dense")
        tok.save_pretrained(work / "dense")
    text, _ = load_text(None, "test")  # the second half (the calibration side; evaluation reads the first)
    stream = tokenize_text(tok, text)
    ids = torch.tensor(stream[len(stream) // 2 :][: 8 * 512]).view(8, 512)
    # each layer's MLP input (post-attention norm output): its mean direction, for the biased router
    seen: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, x, i=i: seen.setdefault(i, []).append(
        x[0].reshape(-1, x[0].shape[-1]).mean(0))) for i, layer in enumerate(dense.model.layers)]  # fmt: skip
    with torch.no_grad():
        ref = dense(ids[:2]).logits
        dense(ids)
    for h in hooks:
        h.remove()
    mean_dirs = [torch.stack(v).mean(0) for _, v in sorted(seen.items())]
    out = {}
    for name, perturb, dirs in (("upcycled", False, None), ("perturbed", True, mean_dirs)):
        d = work / name
        m = upcycle(dense, perturb, dirs)
        with torch.no_grad():
            got = m(ids[:2]).logits
        out[name] = {"max_abs_logit_diff_vs_dense": float((got - ref).abs().max()),
                     "max_abs_logit": float(ref.abs().max())}  # fmt: skip
        if not (d / "config.json").is_file():
            m.save_pretrained(d)
            tok.save_pretrained(d)
        print(name, out[name], flush=True)
    (work / "build.json").write_text(json.dumps(out, indent=2) + "\n")


# ---- quality and policies --------------------------------------------------------------------------------------
def run(work: Path, model: str, tag: str, flags: list[str], windows: int = EVAL_WINDOWS) -> dict:
    """`llmq quantize` then `llmq eval` of OUT, each a process of its own; the summary's time and memory."""
    out = work / "runs" / tag
    if not (out / "eval.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        q = out / "q"
        if not (q / "config.json").is_file():
            sh([sys.executable, "-m", "llmq", "quantize", work / model, q, "--method", "gptq", *CALIB, *flags,
                "--refine", "0", "--overwrite", "--quiet"], out.with_suffix(".quantize.log"))  # GPTQ's, as moe.md
        evaluate(q, out / "eval.json", out.with_suffix(".eval.log"), windows)
    s = json.loads((out / "q" / "summary.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    experts = [layer.get("experts", {}).get("mlp.experts") for layer in s["layers"]]
    experts = [x for x in experts if x]
    return {"model": model, "flags": flags, "ppl": ev["perplexity"], "quantize_time_s": s["quantize_time_s"],
            "total_time_s": s["total_time_s"], "peak_rss_mb": s["peak_rss_mb"], "bits_per_weight": s["bits_per_weight"],
            "file_bytes": s["file_bytes"],
            "policy_applied": sum(len(x["applied_to"]) for x in experts) if experts else None,
            "tokens_per_expert": [sum(x["tokens"][e] for x in experts) for e in range(N_EXPERTS)] if experts else None,
            # each layer's relative output error against the fp layer on the same inputs, and the experts the policy
            # applied to in it
            "rel_errors": [layer.get("rel_error") for layer in s["layers"]],
            "applied_per_layer": [len(x["applied_to"]) for x in experts] if experts else None,
            "min_tokens_per_expert": min(min(x["tokens"]) for x in experts) if experts else None}  # fmt: skip


def evaluate(model: Path, out: Path, log: Path, windows: int = EVAL_WINDOWS) -> float:
    sh([sys.executable, "-m", "llmq", "eval", model, "--max-windows", windows, "--json", out, "--quiet"], log)
    return json.loads(out.read_text())["perplexity"]


def quality(a) -> None:
    work = Path(a.work)
    rows = {}
    for model in ("dense", "upcycled"):
        f = work / "runs" / f"{model}-fp.eval.json"
        if model == "dense" and not f.is_file():  # the upcycle's fp logits are the dense model's (build.json)
            f.parent.mkdir(parents=True, exist_ok=True)
            evaluate(work / model, f, f.with_suffix(".log"))
        if f.is_file():
            rows[f"{model} fp"] = {"model": model, "ppl": json.loads(f.read_text())["perplexity"]}
        for bits in (4, 3):
            rows[f"{model} int{bits} g64"] = run(work, model, f"{model}-int{bits}", ["--bits", str(bits),
                                                                                      "--group-size", "64"])
            print(f"{model} int{bits}", json.dumps(rows[f"{model} int{bits} g64"]), flush=True)
    (work / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")


def truncated(work: Path, layers: int) -> str:
    """The perturbed upcycle's first `layers` decoder layers (and its head): the policies' model, a quarter of the
    work of the whole one on this 2-core machine."""
    import torch
    from transformers import AutoModelForCausalLM

    name = f"perturbed{layers}"
    if not (work / name / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(work / "perturbed", dtype=torch.float32)
        del m.model.layers[layers:]
        m.config.num_hidden_layers = layers
        m.save_pretrained(work / name)
        for f in (work / "perturbed").glob("tokenizer*"):
            (work / name / f.name).write_bytes(f.read_bytes())
    return name


def policies(a) -> None:
    work = Path(a.work)
    rows = {}
    model = truncated(work, POLICY_LAYERS)
    f = work / "runs" / f"{model}-fp.eval.json"
    if not f.is_file():
        f.parent.mkdir(parents=True, exist_ok=True)
        evaluate(work / model, f, f.with_suffix(".log"), POLICY_WINDOWS)
    rows["fp"] = {"ppl": json.loads(f.read_text())["perplexity"]}
    for bits in (3,):
        for policy in ("layer", "rtn", "all"):
            tag = f"{model}-int{bits}-{policy}"
            rows[f"int{bits} g64 {policy}"] = run(work, model, tag, ["--bits", str(bits), "--group-size", "64",
                                                                            "--expert-policy", policy, *POLICY_CALIB],
                                                  POLICY_WINDOWS)  # fmt: skip
            print(tag, json.dumps(rows[f"int{bits} g64 {policy}"]), flush=True)
    (work / "policies.json").write_text(json.dumps(rows, indent=2) + "\n")


# ---- llama.cpp -------------------------------------------------------------------------------------------------
TINY_MOE = {  # the tiny families of the GGUF export, at benchmarks/families_engines.py's shapes
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, num_key_value_heads=4),  # llama.cpp: no GQA
}  # fmt: skip
ROUTER_SCALE = 10.0  # routers x10: decisive routing, so 8-bit activation rounding rarely flips an expert choice


def make_tiny(d: Path, mt: str, router_scale: float = ROUTER_SCALE, **over):
    _benchmarks_path()
    import torch
    from families_engines import SHAPE, VOCAB
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import make_tokenizer

    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(mt, vocab_size=VOCAB, initializer_range=0.05, **(SHAPE | TINY_MOE[mt] | over))
        m = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.gate.weight.mul_(router_scale)
        m.save_pretrained(d)
        make_tokenizer(VOCAB).save_pretrained(d)
    return d


def gguf_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def llama_cpp(a) -> None:
    """Tiny Mixtral / Qwen3-MoE / OLMoE (random weights) and the upcycled SmolLM2, each exported to GGUF by llmq and run
    by llama-perplexity, against llmq running its own checkpoint on the same tokens; the upcycle also against
    llama-quantize's own Q4_K_M of the same model (tensor types, perplexity)."""
    _benchmarks_path()
    import torch
    from families_engines import CHUNKS, CTX, compare, log_probs, read_kl_base
    from families_engines import sh as sh2
    from transformers import AutoModelForCausalLM

    import llmq

    torch.set_num_threads(2)
    work, bin_ = Path(a.work), Path(a.llama_cpp)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import SAMPLE_TEXT

    rows: dict = {"tiny": {}}
    (work / "tiny").mkdir(parents=True, exist_ok=True)
    (work / "tiny" / "text.txt").write_text(SAMPLE_TEXT * 2)
    for mt in TINY_MOE:
        w = work / "tiny" / mt
        src = make_tiny(w / "src", mt)
        g = w / "out"
        if not (g / "model.gguf").is_file():
            sh2([sys.executable, "-m", "llmq", "quantize", src, g, "--for", "llama.cpp:Q4_K_M", "--method", "rtn",
                 "--keep-llmq", "--overwrite", "--quiet"], w / "quantize.log")  # fmt: skip
        gf = next(g.glob("*.gguf"))
        out = sh2([bin_ / "llama-perplexity", "-m", gf, "-f", work / "tiny" / "text.txt", "-c", CTX, "--chunks",
                   CHUNKS, "-b", CTX, "-t", 2, "--kl-divergence-base", w / "logits.bin"],
                  w / "perplexity.log")  # fmt: skip
        tokens, theirs = read_kl_base(w / "logits.bin")
        ours = log_probs(llmq.load_quantized(Path(f"{g}.llmq"), backend="reference"), tokens, CTX)
        fp = log_probs(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tokens, CTX)
        rows["tiny"][mt] = {"llama_cpp_vs_llmq": compare(theirs, ours, tokens, CTX),
                            "llmq_vs_unquantized": compare(ours, fp, tokens, CTX),
                            "gguf_types": dict(sorted(Counter(gguf_types(gf).values()).items())),
                            "llama_perplexity_line": next((ln.strip() for ln in out.splitlines()
                                                           if "Final estimate" in ln), "")}  # fmt: skip
        print(mt, json.dumps(rows["tiny"][mt]), flush=True)
    for model in a.gguf_models:
        rows[model] = upcycled_gguf(work, bin_, model)
    (work / "llama_cpp.json").write_text(json.dumps(rows, indent=2) + "\n")


def llama_cpp_control(a) -> None:
    """Where llama.cpp and llmq part: a tiny Qwen3-MoE as Q8_0 (little weight noise) with top-8 of 8 experts (no
    routing choice: llama.cpp's stacked experts and router against llmq's, nothing else) and with top-2, each beside
    llmq's Q8_0 against the unquantized model."""
    import torch
    from families_engines import CHUNKS, CTX, compare, log_probs, read_kl_base
    from families_engines import sh as sh2
    from transformers import AutoModelForCausalLM

    import llmq

    _benchmarks_path()
    torch.set_num_threads(2)
    work, bin_ = Path(a.work) / "control", Path(a.llama_cpp)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import SAMPLE_TEXT

    (work / "text.txt").write_text(SAMPLE_TEXT * 2)
    rows = {}
    for k in (8, 2):
        w = work / f"top{k}"
        src = make_tiny(w / "src", "qwen3_moe", num_experts_per_tok=k, router_scale=1.0)
        if not list((w / "out").glob("*.gguf")):
            sh2([sys.executable, "-m", "llmq", "quantize", src, w / "out", "--for", "llama.cpp:Q8_0", "--method", "rtn",
                 "--keep-llmq", "--overwrite", "--quiet"], w / "quantize.log")  # fmt: skip
        sh2([bin_ / "llama-perplexity", "-m", next((w / "out").glob("*.gguf")), "-f", work / "text.txt", "-c", CTX,
             "--chunks", CHUNKS, "-b", CTX, "-t", 2, "--kl-divergence-base", w / "logits.bin"], w / "perplexity.log")
        tokens, theirs = read_kl_base(w / "logits.bin")
        ours = log_probs(llmq.load_quantized(w / "out.llmq", backend="reference"), tokens, CTX)
        fp = log_probs(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tokens, CTX)
        rows[f"top-{k} of 8"] = {"llama_cpp_vs_llmq": compare(theirs, ours, tokens, CTX),
                                 "llmq_vs_unquantized": compare(ours, fp, tokens, CTX)}
        print(k, json.dumps(rows[f"top-{k} of 8"]), flush=True)
    (Path(a.work) / "llama_cpp_control.json").write_text(json.dumps(rows, indent=2) + "\n")


def upcycled_gguf(work: Path, bin_: Path, model: str) -> dict:
    _benchmarks_path()
    import torch
    from families_engines import compare, read_kl_base

    import llmq
    from llmq.data import load_text

    w = work / "gguf" / model
    w.mkdir(parents=True, exist_ok=True)
    ctx, chunks = 512, 16
    text, _ = load_text(None, "test")
    (w / "eval.txt").write_text(text[: len(text) // 2])  # the evaluation half
    ours_dir = w / "llmq-q4km"
    t0 = time.perf_counter()
    if not (ours_dir / "model.gguf").is_file() and not list(ours_dir.glob("*.gguf")):
        sh([sys.executable, "-m", "llmq", "quantize", work / model, ours_dir, "--for", "llama.cpp:Q4_K_M",
            "--method", "rtn", "--keep-llmq", "--overwrite", "--quiet"], w / "quantize.log")  # fmt: skip
    secs = time.perf_counter() - t0
    ours = next(ours_dir.glob("*.gguf"))
    # llama.cpp's own: convert_hf_to_gguf.py (f32) then llama-quantize Q4_K_M (no imatrix), as a user of llama.cpp does
    f32, ref = w / f"{model}-f32.gguf", w / "llama-quantize-q4km.gguf"
    conv = bin_.parent.parent / "convert_hf_to_gguf.py"
    if not f32.is_file():
        sh([sys.executable, conv, work / model, "--outfile", f32, "--outtype", "f32"], w / "convert.log")
    if not ref.is_file():
        sh([bin_ / "llama-quantize", f32, ref, "Q4_K_M"], w / "llama-quantize.log")
    mine, theirs = gguf_types(ours), gguf_types(ref)
    same = sum(mine[k] == theirs.get(k) for k in mine)
    diff = {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}
    res = {"gguf_bytes": ours.stat().st_size, "llama_quantize_bytes": ref.stat().st_size,
           "types_equal": f"{same}/{len(mine)}", "types_differ": dict(list(diff.items())[:12]),
           "llmq_quantize_seconds": round(secs, 1)}  # fmt: skip
    for tag, g in (("llmq_rtn_q4km", ours), ("llama_quantize_q4km", ref), ("f32", f32)):
        out, _ = sh([bin_ / "llama-perplexity", "-m", g, "-f", w / "eval.txt", "-c", ctx, "--chunks", chunks, "-b",
                     ctx, "-t", 2, *(["--kl-divergence-base", w / "logits.bin"] if tag == "llmq_rtn_q4km" else [])],
                    w / f"perplexity-{tag}.log")  # fmt: skip
        res[f"{tag}_llama_ppl"] = next((ln.strip() for ln in out.splitlines() if "Final estimate" in ln), "")
    tokens, lc = read_kl_base(w / "logits.bin")
    q = llmq.load_quantized(Path(f"{ours_dir}.llmq"), backend="reference")
    x = torch.tensor(tokens).view(-1, ctx)
    with torch.no_grad():
        mine_lp = torch.cat([torch.log_softmax(q(r[None]).logits.double(), -1)[:, ctx // 2 : ctx - 1] for r in x])
    res["llama_cpp_vs_llmq"] = compare(lc, mine_lp, tokens, ctx)
    print(model, json.dumps(res), flush=True)
    return res


# ---- vLLM ------------------------------------------------------------------------------------------------------
def prepare_vllm(a) -> None:
    """The tiny Qwen3-MoE and Mixtral as int4 g64 compressed-tensors by RTN (asymmetric, --for vllm's pick, and
    symmetric), and llmq's prompt log-probs for 4 windows of 64 tokens."""
    _benchmarks_path()
    import torch
    from families_engines import CTX, VOCAB
    from safetensors.torch import save_file

    import llmq

    torch.set_num_threads(2)
    w = Path(a.work) / "vllm"
    w.mkdir(parents=True, exist_ok=True)
    tokens = torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(0))
    for mt in ("qwen3_moe", "mixtral"):
        src = make_tiny(w / mt / "src", mt)
        for sym in ("--sym", "--no-sym"):
            out = w / mt / sym.strip("-")
            if not (out / "config.json").is_file():
                sh([sys.executable, "-m", "llmq", "quantize", src, out, "--for", "vllm", sym, "--method", "rtn",
                    "--keep-llmq", "--overwrite", "--quiet"], w / mt / f"quantize-{sym.strip('-')}.log")  # fmt: skip
            with torch.no_grad():
                lp = torch.log_softmax(llmq.load_quantized(Path(f"{out}.llmq"), backend="reference")(tokens)
                                       .logits.double(), -1)  # fmt: skip
            save_file({"tokens": tokens, "llmq_logp": lp.float()}, str(out.parent / f"windows-{out.name}.safetensors"))


def vllm_part(a) -> None:
    """Runs in the vLLM venv (no llmq import): load each export; its prompt log-probs against llmq's, or the error."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernel_speed.py shadows `kernels`
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its exception is the root cause
    import torch
    import vllm
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    w = Path(a.work) / "vllm"
    rows = {}
    for mt in ("qwen3_moe", "mixtral"):
        for sym in ("sym", "no-sym"):
            t = load_file(str(w / mt / f"windows-{sym}.safetensors"))
            try:
                llm = LLM(model=str(w / mt / sym), dtype="float16", enforce_eager=True, max_model_len=65,
                          max_logprobs=300, seed=0, distributed_executor_backend="uni")  # fmt: skip
                res = llm.generate([TokensPrompt(prompt_token_ids=x.tolist()) for x in t["tokens"]],
                                   SamplingParams(max_tokens=1, prompt_logprobs=300), use_tqdm=False)  # fmt: skip
                theirs = torch.full(t["llmq_logp"].shape, float("nan"), dtype=torch.float64)
                for i, r in enumerate(res):
                    for p, lp in enumerate(r.prompt_logprobs):
                        for tok, v in (lp or {}).items():
                            theirs[i, p - 1, tok] = v.logprob
                d = (theirs[:, :-1] - t["llmq_logp"].double()[:, :-1]).abs()
                ok = ~torch.isnan(d)
                rows[f"{mt} {sym}"] = {"loaded": True, "max_abs_logp_diff": float(d[ok].max()),
                                       "mean_abs_logp_diff": float(d[ok].mean()), "compared": int(ok.sum())}
                del llm
            except Exception as e:  # noqa: BLE001 -- what vLLM says is the result
                rows[f"{mt} {sym}"] = {"loaded": False, "error": f"{type(e).__name__}: {str(e)[-600:]}"}
            print(mt, sym, rows[f"{mt} {sym}"], flush=True)
    (w / "vllm.json").write_text(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "runs": rows},
                                            indent=2) + "\n")  # fmt: skip


# ---- report ----------------------------------------------------------------------------------------------------
def _load(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def report(a) -> None:
    _benchmarks_path()
    from common import machine, machine_line, write_results

    work = Path(a.work)
    built, qual, pol = _load(work / "build.json"), _load(work / "quality.json"), _load(work / "policies.json")
    lc, vl = _load(work / "llama_cpp.json"), _load(work / "vllm" / "vllm.json")
    ctrl = _load(work / "llama_cpp_control.json")
    m = machine()
    md = ["# Mixtures of experts: SmolLM2 upcycled into 8 experts", "", machine_line(m), "",
          "`python benchmarks/moe.py` (its docstring: the models and the protocol). " + PROTOCOL, ""]
    if built:
        md += [f"The upcycle with identical experts computes SmolLM2: largest |logit difference| "
               f"{built['upcycled']['max_abs_logit_diff_vs_dense']:.2g} (logits up to "
               f"{built['upcycled']['max_abs_logit']:.0f}).", ""]
    if qual:
        md += ["## Quality: dense SmolLM2 against its upcycle, same scheme and calibration", "",
               "| model | scheme | perplexity | vs dense at the scheme | fewest tokens an expert got (layer) | "
               "quantize time | peak RSS | bits/weight |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for key, r in qual.items():
            model, _, scheme = key.partition(" ")
            dense = qual.get(f"dense {scheme}", {}).get("ppl")
            rel = f"{100 * (r['ppl'] / dense - 1):+.2f}%" if dense and model != "dense" else ""
            md.append(f"| {model} | {scheme} | {r['ppl']:.3f} | {rel} | {r.get('min_tokens_per_expert') or ''} | "
                      + (f"{r['quantize_time_s']:.0f} s | {r['peak_rss_mb']:.0f} MB | {r['bits_per_weight']:.3f} |"
                         if "quantize_time_s" in r else " | | |"))  # fmt: skip
        md.append("")
    if pol:
        md += ["## Expert policies on the perturbed upcycle (experts differ; experts 5-7 rarely routed)", "",
               f"Its first {POLICY_LAYERS} layers (the whole model's three runs did not fit this session's time), int3 "
               f"g64 GPTQ, calibration {POLICY_CALIB[1]} x {POLICY_CALIB[3]} tokens (so that the rarely routed experts "
               "get few). Cut to 8 layers it is no language model (its perplexity is in the millions, in the JSON), so "
               "the measure is each layer's relative output error against the fp layer on the same inputs "
               "(summary.json), averaged over the layers, and over the layers where the policy applied.", "",
               "| policy | mean relative output error, all layers | on the layers it applied to | experts it applied "
               "to (all layers) | tokens routed per expert, summed over layers |",
               "|---|---:|---:|---:|---|"]  # fmt: skip
        for key, r in pol.items():
            if "rel_errors" not in r:
                continue
            errs = [x for x in r["rel_errors"] if x is not None]
            hit = [x for x, n in zip(r["rel_errors"], r["applied_per_layer"] or []) if n and x is not None]
            md.append(f"| {key.split()[-1]} | {sum(errs) / len(errs):.4f} | "
                      f"{(sum(hit) / len(hit)) if hit else float('nan'):.4f} ({len(hit)} layers) | "
                      f"{r.get('policy_applied', '')} | {r.get('tokens_per_expert', '')} |")  # fmt: skip
        md.append("")
    if lc:
        md += ["## llama.cpp", "", "Tiny random-init models (benchmarks/families_engines.py's shapes, 8 experts, "
               f"top 2, routers x{ROUTER_SCALE:g}), `--for llama.cpp:Q4_K_M` by RTN, llama-perplexity against llmq's "
               "own checkpoint on the same tokens:", "",
               "| family | llama.cpp vs llmq: max / mean abs Δ log-prob | top-1 agree | ppl llama.cpp / llmq | "
               "Q4_K_M vs unquantized: mean abs Δ | tensor types |", "|---|---|---|---|---|---|"]  # fmt: skip
        for mt, r in lc["tiny"].items():
            e, q = r["llama_cpp_vs_llmq"], r["llmq_vs_unquantized"]
            md.append(f"| {mt} | {e['max_abs_logp_diff']:.4f} / {e['mean_abs_logp_diff']:.5f} | "
                      f"{e['top1_agreement']:.3f} | {e['ppl'][0]:.3f} / {e['ppl'][1]:.3f} | "
                      f"{q['mean_abs_logp_diff']:.4f} | {r['gguf_types']} |")  # fmt: skip
        if ctrl:
            md += ["", "Where llama.cpp and llmq part on these tiny models (`llama-cpp-control`): the routing. A tiny "
                   "Qwen3-MoE as Q8_0 (little weight noise), unscaled router:", "",
                   "| experts used | llama.cpp vs llmq: max / mean abs Δ log-prob | top-1 agree | llmq Q8_0 vs "
                   "unquantized: mean abs Δ |", "|---|---|---|---|"]  # fmt: skip
            for key, r in ctrl.items():
                e, q = r["llama_cpp_vs_llmq"], r["llmq_vs_unquantized"]
                md.append(f"| {key} | {e['max_abs_logp_diff']:.4f} / {e['mean_abs_logp_diff']:.5f} | "
                          f"{e['top1_agreement']:.3f} | {q['mean_abs_logp_diff']:.5f} |")
            md += ["", "With every expert used there is no routing choice, and llama.cpp and llmq agree within the "
                   "8-bit activation rounding llama.cpp's CPU matmuls do: the stacked experts and the router are read "
                   "as llmq wrote them. With a top-k choice, any perturbation of the router's input (llama.cpp's "
                   "activation rounding as much as the weights' quantization noise) flips near-tied choices, and a "
                   "flipped expert moves a token's output by a whole expert: the two differences come out alike. On "
                   "a real model's routers the margins are wider (the upcycle below)."]
        for model in ("upcycled", "perturbed"):
            u = lc.get(model)
            if not u:
                continue
            e = u["llama_cpp_vs_llmq"]
            md += ["", f"The {model} SmolLM2, `llmq quantize --for llama.cpp:Q4_K_M --method rtn` against llama.cpp's "
                   "own `convert_hf_to_gguf.py` + `llama-quantize Q4_K_M` (no imatrix) of the same "
                   f"model: tensor types equal for {u['types_equal']} tensors"
                   + (f" (differing: {u['types_differ']})" if u["types_differ"] else "") + "; llama-perplexity "
                   f"(16 chunks of 512 from the evaluation half): llmq `{u['llmq_rtn_q4km_llama_ppl']}`, "
                   f"llama-quantize `{u['llama_quantize_q4km_llama_ppl']}`, f32 `{u['f32_llama_ppl']}`; llama.cpp "
                   f"running llmq's GGUF against llmq running its checkpoint: max / mean |Δ log-prob| "
                   f"{e['max_abs_logp_diff']:.4f} / {e['mean_abs_logp_diff']:.5f}, top-1 agreement "
                   f"{e['top1_agreement']:.3f}. GGUF {u['gguf_bytes'] / 2**20:.0f} MiB (llama-quantize "
                   f"{u['llama_quantize_bytes'] / 2**20:.0f} MiB)."]  # fmt: skip
        md.append("")
    if vl:
        md += ["## vLLM", "", f"vLLM {vl['vllm']} (CPU build, torch {vl['torch']}), the tiny Qwen3-MoE and Mixtral as "
               "`--for vllm` int4 g64 compressed-tensors, asymmetric (its pick) and `--sym`:", ""]
        for k, r in vl["runs"].items():
            md.append(f"- {k}: " + (f"loaded; prompt log-probs against llmq's: max / mean |Δ| "
                                    f"{r['max_abs_logp_diff']:.4f} / {r['mean_abs_logp_diff']:.5f} over "
                                    f"{r['compared']} pairs" if r["loaded"] else f"not served: `{r['error']}`"))
        md.append("")
    write_results("moe", {"machine": m, "build": built, "quality": qual, "policies": pol, "llama_cpp": lc,
                          "vllm": vl}, "\n".join(md) + "\n")  # fmt: skip
    print("\n".join(md))


PROTOCOL = (f"WikiText-2 test; calibration {CALIB[-3]} x {CALIB[-1]} tokens (seed 0) from the second half of the "
            f"token stream; perplexity `llmq eval`, first {EVAL_WINDOWS} windows of 2048 (the first half). Every run "
            "is "
            "`llmq quantize` then `llmq eval`, each a process of its own, one at a time, OMP_NUM_THREADS=2.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["build", "quality", "policies", "llama-cpp", "llama-cpp-control", "prepare-vllm",
                                    "vllm", "report"])
    p.add_argument("--work", default="/tmp/llmq-moe")
    p.add_argument("--llama-cpp", default=None, help="dir holding llama-perplexity (llama-cpp step)")
    p.add_argument("--gguf-models", nargs="*", default=["upcycled"], choices=["upcycled", "perturbed"],
                   help="llama-cpp step: the upcycles to export and run")
    a = p.parse_args()
    {"build": build, "quality": quality, "policies": policies, "llama-cpp": llama_cpp, "prepare-vllm": prepare_vllm,
     "llama-cpp-control": llama_cpp_control, "vllm": vllm_part, "report": report}[a.step](a)


if __name__ == "__main__":
    main()
