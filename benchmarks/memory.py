"""Peak memory of a streamed GPTQ conversion of a checkpoint far larger than one layer.

    python benchmarks/memory.py [--dir /tmp/llmq-mem] [--layers 56] [--method gptq|rtn] [--nsamples 8] [--seqlen 256]
    python benchmarks/memory.py --moe --layers 1 [--experts-per-pass 0 16]   # results/memory-moe.{json,md}

Generates (once; not committed) a random-init Llama-architecture checkpoint in fp16 safetensors shards:
hidden 2048, intermediate 5632, 16 heads, untied 49,152-token embedding and head (SmolLM2's tokenizer is
copied in for calibration), `--layers` decoder layers (56 -> 6.2 GB). Then runs `llmq quantize --method gptq`
(GPTQ by default; RTN streams the same way without calibration) on it in a subprocess and reads that
process's peak RSS (the kernel's VmHWM of that process, from summary.json; not getrusage, which Linux
carries over from the parent across fork + exec).

The one-layer budget is computed from the real sizes: process baseline (RSS after importing torch,
transformers and llmq) + one decoder layer in fp32 + the largest Hessian set held at once + calibration
activations (inputs, reference outputs, the replayed blocks' recorded attention output and MLP input) + embeddings
and head in fp32.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, default_model, machine, machine_line, write_results  # noqa: E402

H, I, HEADS, VOCAB = 2048, 5632, 16, 49152


def generate(d: Path, layers: int) -> int:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    if (d / "config.json").is_file():
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))
    d.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                num_hidden_layers=layers, vocab_size=VOCAB, tie_word_embeddings=False,
                max_position_embeddings=4096, dtype="float16").save_pretrained(d)  # fmt: skip
    src = default_model()
    p = Path(src)
    AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    weight_map, shards, per_shard = {}, [], 8
    groups = [("rest", None)] + [(f"{s}", list(range(s, min(s + per_shard, layers)))) for s in range(0, layers, per_shard)]
    for gi, (tag, ids) in enumerate(groups):
        t = {}
        if ids is None:
            t = {"model.embed_tokens.weight": rnd(VOCAB, H), "lm_head.weight": rnd(VOCAB, H),
                 "model.norm.weight": torch.ones(H, dtype=torch.float16)}  # fmt: skip
        else:
            for i in ids:
                pre = f"model.layers.{i}."
                t |= {pre + f"self_attn.{n}_proj.weight": rnd(H, H) for n in "qkvo"}
                t |= {pre + "mlp.gate_proj.weight": rnd(I, H), pre + "mlp.up_proj.weight": rnd(I, H),
                      pre + "mlp.down_proj.weight": rnd(H, I), pre + "input_layernorm.weight": torch.ones(H, dtype=torch.float16),
                      pre + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.float16)}  # fmt: skip
        name = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(t, str(d / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in t}
        shards.append(name)
        del t
    total = sum((d / s).stat().st_size for s in shards)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


# one layer of Qwen3-30B-A3B's shape (issue 35): 128 experts of 2048 x 768, top 8; attention 32 x 128 heads, 4 kv
MOE = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
           num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)  # fmt: skip


def generate_moe(d: Path, layers: int) -> int:
    """A random-init Qwen3-MoE checkpoint of MOE's shape, bf16, per-expert tensors as the released checkpoints store
    them (transformers' save_pretrained), SmolLM2's tokenizer (so the vocabulary is 49,152, not Qwen3's 151,936)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    if (d / "config.json").is_file():
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096,
                         tie_word_embeddings=False, **MOE)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # ~1.2 GB per layer in bf16
    model.save_pretrained(d, max_shard_size="2GB")
    p = Path(default_model())
    AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(d)
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def moe_model(shape: dict, tokens: int, chunk: int, baseline_mb: float, vocab: int = VOCAB,
              bits: float = 4.25) -> dict:  # fmt: skip
    """The documented memory of one MoE layer's GPTQ conversion (docs/SCALE.md), MB: what the process holds at the
    experts' solve. `chunk`: experts whose Hessians are alive at once (--experts-per-pass)."""
    f32, MB = 4, 2**20
    h, i = shape["hidden_size"], shape["moe_intermediate_size"]
    e, k = shape["num_experts"], shape["num_experts_per_tok"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    attn = h * q + 2 * h * kv + q * h
    experts = 3 * e * h * i
    out = {"baseline": baseline_mb,
           "layer_fp32": (attn + experts + e * h) * f32 / MB,
           "expert_hessians": chunk * max(h, i) ** 2 * f32 / MB,
           # layer inputs, the error reference (<= 2048 tokens), the attention's replayed o_proj input, the experts'
           # recorded calls (hidden states, top-k index int64 and weights)
           "activations": (tokens * h + min(tokens, 2048) * h + tokens * q + tokens * h) * f32 / MB
           + tokens * k * (8 + f32) / MB,
           "packed_layer": (attn + experts) * bits / 8 / MB,
           # while the layer is read: its shard's pages (bf16 on disk), mapped by safetensors and counted in RSS until
           # the file is closed, beside the fp32 copy being made
           "layer_on_disk_bf16": (attn + experts + e * h) * 2 / MB}  # fmt: skip
    out["solve_phase"] = sum(out[k] for k in ("baseline", "layer_fp32", "expert_hessians", "activations",
                                              "packed_layer"))  # fmt: skip
    out["read_phase"] = sum(out[k] for k in ("baseline", "layer_fp32", "layer_on_disk_bf16", "activations"))
    # the embeddings (fp32) are held only while layer 0's inputs are captured, the head not at all: both are released
    # before the layer loop and written at the end in the storage dtype, after the last layer is released
    out["total"] = max(out["solve_phase"], out["read_phase"])
    out["embeddings_fp32_calibration_only"] = vocab * h * f32 / MB
    return {k: round(v) for k, v in out.items()}


def moe_main(a) -> int:
    m = machine()
    d = Path(a.dir)
    ckpt_bytes = generate_moe(d / "moe-model", a.layers)
    base = baseline_rss_mb()
    rows = []
    for chunk in a.experts_per_pass:
        out = d / f"moe-quantized-{chunk}"
        cmd = [sys.executable, "-m", "llmq", "quantize", str(d / "moe-model"), str(out), "--method", "gptq", "--bits",
               "4", "--group-size", "128", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--calib-split",
               "test", "--experts-per-pass", str(chunk), "--overwrite", "--quiet"]  # fmt: skip
        subprocess.run(cmd, check=True)
        s = json.loads((out / "summary.json").read_text())
        used = next(x["experts_per_pass"] for x in (layer["experts"].get("mlp.experts") for layer in s["layers"]) if x)
        rows.append({"experts_per_pass": used, "peak_rss_mb": s["peak_rss_mb"], "total_time_s": s["total_time_s"],
                     "quantize_time_s": s["quantize_time_s"], "phases_s": s.get("phases_s"),
                     "bits_per_weight": round(s["bits_per_weight"], 4)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    payload = {"machine": m, "shape": MOE, "layers": a.layers, "calibration_tokens": a.nsamples * a.seqlen,
               "checkpoint_bytes": ckpt_bytes, "baseline_rss_mb": base, "runs": rows, "note": a.note}  # fmt: skip
    moe_report(payload)
    return 0


def moe_report(payload: dict) -> None:
    """results/memory-moe.{json,md} from the runs: the model (moe_model) beside each measured peak, and projections."""
    m, rows = payload["machine"], payload["runs"]
    base, tokens = payload["baseline_rss_mb"], payload["calibration_tokens"]
    for r in rows:
        r["model_mb"] = moe_model(MOE, tokens, r["experts_per_pass"], base)
        r["peak_over_model"] = round(r["peak_rss_mb"] / r["model_mb"]["total"], 3)
    proj = {name: moe_model(shape, 128 * 2048, chunk, base, vocab) for name, (shape, chunk, vocab) in PROJECTED.items()}
    a = SimpleNamespace(layers=payload["layers"], nsamples=tokens // 256, seqlen=256)
    ckpt_bytes = payload["checkpoint_bytes"]
    md = ["# Memory: one Qwen3-30B-A3B-shaped MoE layer, streamed GPTQ", "", machine_line(m), "",
          f"A random-init Qwen3-MoE checkpoint of {a.layers} layer(s) (hidden {MOE['hidden_size']}, "
          f"{MOE['num_experts']} "
          f"experts of {MOE['moe_intermediate_size']}, top {MOE['num_experts_per_tok']}, 32 x 128 heads, 4 kv heads; "
          f"SmolLM2's 49,152-token vocabulary), {ckpt_bytes / 2**30:.2f} GiB in bf16; `llmq quantize --method gptq "
          f"--bits 4 --group-size 128`, {a.nsamples} x {a.seqlen} calibration tokens, each run a process of its own "
          "(peak RSS: its VmHWM). The model is `moe_model()` in benchmarks/memory.py, the table in docs/SCALE.md.", "",
          "| --experts-per-pass | model: layer fp32 | expert Hessians | activations | packed | layer on disk | "
          "baseline | solve / read phase | **model (the larger)** | **measured peak** | peak / model | time |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        mm = r["model_mb"]
        md.append(f"| {r['experts_per_pass']} | {mm['layer_fp32']} | {mm['expert_hessians']} | {mm['activations']} | "
                  f"{mm['packed_layer']} | {mm['layer_on_disk_bf16']} | {mm['baseline']} | {mm['solve_phase']} / "
                  f"{mm['read_phase']} | **{mm['total']}** | **{r['peak_rss_mb']:.0f}** | {r['peak_over_model']} | "
                  f"{r['total_time_s']:.0f} s |")  # fmt: skip
    md += ["", f"The embeddings (fp32, {rows[0]['model_mb']['embeddings_fp32_calibration_only']} MB) are held only "
           "while layer 0's inputs are captured and the head not at all: both are released before the layer loop and "
           "written at the end in the storage dtype, after the last layer is released."]
    if payload.get("note"):
        md += ["", payload["note"]]
    md += ["", "Projected with the same model (128 x 2048 calibration tokens, one process holding one layer):", "",
           "| model | layer fp32 | expert Hessians (chunk) | activations | total MB |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for name, p in proj.items():
        md.append(f"| {name} | {p['layer_fp32']} | {p['expert_hessians']} ({PROJECTED[name][1]}) | "
                  f"{p['activations']} | "
                  f"{p['total']} |")  # fmt: skip
    write_results("memory-moe", payload | {"projected": proj}, "\n".join(md) + "\n")
    print("\n".join(md))


# shape, experts per pass (the default: 8 GiB of Hessians), vocabulary
PROJECTED = {
    "Qwen3-30B-A3B": (MOE, 128, 151936),
    "Qwen3-235B-A22B": (dict(hidden_size=4096, moe_intermediate_size=1536, num_attention_heads=64,
                             num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8), 128, 151936),
    # MLA attention counted as q/kv/o of 128 heads x 128 (a little above its low-rank projections)
    "DeepSeek-V3 (MoE layer)": (dict(hidden_size=7168, moe_intermediate_size=2048, num_attention_heads=128,
                                     num_key_value_heads=128, head_dim=128, num_experts=256, num_experts_per_tok=8), 41,
                                129280),
}  # fmt: skip


def baseline_rss_mb() -> float:
    code = "import torch, transformers, llmq; from llmq.summary import peak_rss_mb; print(peak_rss_mb())"
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llmq-mem")
    ap.add_argument("--layers", type=int, default=56)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calib", default=None, help="calibration text (default: local WikiText-2 test split)")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--out", default=None, help="results name (default memory-METHOD)")
    ap.add_argument("--flags", default="", help="more `llmq quantize` flags, e.g. \"--no-clip-search\"")
    ap.add_argument("--moe", action="store_true", help="one Qwen3-30B-A3B-shaped MoE layer instead (--layers 1)")
    ap.add_argument("--experts-per-pass", type=int, nargs="+", default=[0, 16], help="with --moe: runs to make")
    ap.add_argument("--note", default="", help="with --moe: a line for the results (e.g. what else ran)")
    ap.add_argument("--report", action="store_true", help="with --moe: rewrite the results from memory-moe.json")
    a = ap.parse_args()
    if a.moe and a.report:
        payload = json.loads((RESULTS / "memory-moe.json").read_text())
        payload.setdefault("baseline_rss_mb", next(iter(payload["runs"]))["model_mb"]["baseline"])
        payload["note"] = a.note or payload.get("note", "")
        moe_report(payload)
        return 0
    if a.moe:
        return moe_main(a)
    m = machine()  # at the start: the code this run imported
    d = Path(a.dir)
    ckpt_bytes = generate(d / "model", a.layers)
    out = d / "quantized"
    cmd = [sys.executable, "-m", "llmq", "quantize", str(d / "model"), str(out), "--method", a.method, "--bits", "4",
           "--group-size", "128", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--calib-split", "test",
           "--overwrite", "--quiet"] + (["--calib", a.calib] if a.calib else []) + shlex.split(a.flags)  # fmt: skip
    subprocess.run(cmd, check=True)
    s = json.loads((out / "summary.json").read_text())
    f32 = 4
    layer = (4 * H * H + 3 * H * I) * f32
    gptq = a.method == "gptq"
    hessians = max(H * H, I * I) * f32 if gptq else 0  # one H per distinct input, one group at a time: down's
    # inputs, the error reference (<= 2048 tokens), the replayed attention's output and MLP's input (pipeline._Replay)
    tokens = a.nsamples * a.seqlen
    acts = (tokens * H + min(tokens, 2048) * H + tokens * (H + I)) * f32 if gptq else 0
    emb = 2 * VOCAB * H * f32
    base = baseline_rss_mb()
    budget_mb = base + (layer + hessians + acts + emb) / 2**20
    peak = s["peak_rss_mb"]
    row = {"checkpoint_gb": round(ckpt_bytes / 1e9, 2), "layers": a.layers, "peak_rss_mb": peak,
           "baseline_rss_mb": round(base), "layer_fp32_mb": round(layer / 2**20), "hessians_mb": round(hessians / 2**20),
           "activations_mb": round(acts / 2**20), "embeddings_head_fp32_mb": round(emb / 2**20),
           "one_layer_budget_mb": round(budget_mb), "peak_over_budget": round(peak / budget_mb, 2),
           "peak_over_checkpoint": round(peak * 2**20 / ckpt_bytes, 3), "total_time_s": s["total_time_s"],
           "streamed": s["streamed"], "bits_per_weight": round(s["bits_per_weight"], 4),
           "method": a.method, "calibration": f"{a.nsamples} x {a.seqlen}" if gptq else None}  # fmt: skip
    ok1, ok2 = row["peak_over_checkpoint"] < 1 / 3, row["peak_over_budget"] <= 1.5
    md = [f"# Memory: streamed {a.method.upper()} conversion of a {row['checkpoint_gb']} GB checkpoint", "", machine_line(m), "",
          __doc__.split("Generates")[1].strip().replace("\n", " ").join(["Generates", ""]) , "",
          "| what | MB |", "| --- | ---: |"]  # fmt: skip
    for k in ("baseline_rss_mb", "layer_fp32_mb", "hessians_mb", "activations_mb", "embeddings_head_fp32_mb",
              "one_layer_budget_mb", "peak_rss_mb"):  # fmt: skip
        md.append(f"| {k.removesuffix('_mb').replace('_', ' ')} | {row[k]} |")
    md += ["", f"Checkpoint on disk: {ckpt_bytes / 2**20:.0f} MB. Peak RSS / checkpoint = {row['peak_over_checkpoint']} "
           f"(goal < 0.333: {'met' if ok1 else 'NOT met'}); peak / one-layer budget = {row['peak_over_budget']} "
           f"(goal <= 1.5: {'met' if ok2 else 'NOT met'}). Conversion time {row['total_time_s']} s, "
           f"calibration {row['calibration'] or 'none'}."]  # fmt: skip
    write_results(a.out or f"memory-{a.method}", {"machine": m, **row}, "\n".join(md) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
