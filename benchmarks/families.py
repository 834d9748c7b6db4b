"""One decoder layer of each newly discovered family at its real size, converted with GPTQ: seconds per phase and
peak memory (issue 34's families.md).

    python benchmarks/families.py [--dir /tmp/llmq-families] [--families qwen3-8b gemma3-12b deepseek-v3-dense]
                                  [--nsamples 8] [--seqlen 512]

Each model is generated once (not committed): the family's real hidden, intermediate and attention sizes (from its
published config), ONE decoder layer, random fp16 weights, a small vocabulary (4096, with a byte-level BPE trained on a
sample text: the layer is what is measured, not the embedding), then `llmq quantize --method gptq` (the default recipe:
act-order, static groups, clip search, true-sequential groups with replay) on WikiText-2 calibration windows, in a
subprocess of its own; time and peak RSS from its summary.json. What `--dry-run` found is recorded too. Results:
benchmarks/results/families.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, machine_line, write_results  # noqa: E402

VOCAB = 4096
FAMILIES = {
    # Qwen3-8B: hidden 4096, intermediate 12288, 32 heads of 128, 8 kv heads, q/k norms
    "qwen3-8b": ("qwen3", {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                           "num_key_value_heads": 8, "head_dim": 128}),
    # Gemma-3-12B's text model: hidden 3840, intermediate 15360, 16 heads of 256, 8 kv heads, 1 + w norms
    "gemma3-12b": ("gemma3_text", {"hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
                                   "num_key_value_heads": 8, "head_dim": 256}),
    # DeepSeek-V3's dense layers (its first three): hidden 7168, intermediate 18432, MLA with 128 heads
    "deepseek-v3-dense": ("deepseek_v3", {"hidden_size": 7168, "intermediate_size": 18432, "num_attention_heads": 128,
                                          "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
                                          "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                                          "first_k_dense_replace": 1, "n_routed_experts": 8,
                                          "moe_intermediate_size": 2048}),
}  # fmt: skip


def generate(d: Path, model_type: str, sizes: dict) -> int:
    import torch
    from tiny import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (d / "config.json").is_file():
        cfg = AutoConfig.for_model(model_type, num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=4096,
                                   tie_word_embeddings=False, **sizes)  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        model.save_pretrained(d)
        make_tokenizer(VOCAB).save_pretrained(d)
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmq-families"))
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    m = machine()
    rows = []
    for name in a.families:
        mt, sizes = FAMILIES[name]
        src, out = a.dir / name, a.dir / f"{name}-q"
        nbytes = generate(src, mt, sizes)
        found = json.loads(subprocess.run([sys.executable, "-m", "llmq", "quantize", str(src), str(out), "--dry-run",
                                           "--json"], capture_output=True, text=True, check=True).stdout)  # fmt: skip
        subprocess.run([sys.executable, "-m", "llmq", "quantize", str(src), str(out), "--method", "gptq", "--nsamples",
                        str(a.nsamples), "--seqlen", str(a.seqlen), "--calib-split", "test", "--overwrite", "--quiet"],
                       check=True)  # fmt: skip
        s = json.loads((out / "summary.json").read_text())
        layer = s["layers"][0]
        rows.append({"family": name, "model_type": mt, "sizes": sizes, "layer_params": sum(
            g["shape"][0] * g["shape"][1] for grp in found["groups"] for g in grp), "fp16_bytes": nbytes,
            "groups": [[g["name"] for g in grp] for grp in found["groups"]], "layer_seconds": layer["seconds"],
            "phases": layer.get("phases"), "total_seconds": s["total_time_s"], "peak_rss_mb": s["peak_rss_mb"],
            "rel_error": layer.get("rel_error"), "bits_per_weight": s["bits_per_weight"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    md = ["# One decoder layer of each new family at its real size: GPTQ time and peak memory", "", machine_line(m), "",
          f"`python benchmarks/families.py` — one random-init fp16 decoder layer, vocabulary {VOCAB}, GPTQ int4 g128 "
          f"(default recipe), {a.nsamples} x {a.seqlen} WikiText-2 calibration tokens, in a subprocess; groups as "
          "`llmq quantize --dry-run` found them.", "",
          "| family | linears (groups) | layer params | layer seconds | of which column loop / cholesky / forward | "
          "peak RSS | relative output error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ph = r["phases"] or {}
        groups = " · ".join("+".join(n.split(".")[-1] for n in g) for g in r["groups"])
        md.append(f"| {r['family']} | {groups} | {r['layer_params'] / 1e6:.0f} M | {r['layer_seconds']:.1f} | "
                  f"{ph.get('column_loop', 0):.1f} / {ph.get('cholesky', 0):.1f} / {ph.get('forward', 0):.1f} | "
                  f"{r['peak_rss_mb']:.0f} MB | {r['rel_error']:.4f} |")  # fmt: skip
    md += ["", "The exports in llama.cpp and vLLM: the section below (benchmarks/families_engines.py)."]
    write_results("families", {"machine": m, "nsamples": a.nsamples, "seqlen": a.seqlen, "rows": rows},
                  "\n".join(md) + "\n")  # fmt: skip
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
