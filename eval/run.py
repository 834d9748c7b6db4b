"""`llmq eval`: perplexity of a full-precision or llmq model, as a table and a JSON record."""
from __future__ import annotations

import datetime
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llmq import record, sources
from llmq.calibration import tokenize_text
from llmq.data import load_text
from llmq.dtypes import DTYPES
from llmq.errors import LlmqError
from llmq.inspect import inspect_dir
from llmq.modeling import load_quantized
from llmq.summary import machine, peak_rss_mb, versions

from .perplexity import perplexity, text_sha256


def open_model(spec: str, device: str, dtype: torch.dtype | None):
    """(model, tokenizer, facts about the model) for an llmq checkpoint dir or anything `sources` opens."""
    p = Path(spec)
    if p.is_dir() and record.is_llmq_dir(p):
        info = inspect_dir(p, verify=False)  # load_quantized below hashes the shards
        model = load_quantized(p, dtype=dtype, device=device)
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise LlmqError(f"{p}: no tokenizer in the checkpoint dir ({str(e).splitlines()[0]})") from None
        method = record.read(p)[1].method
        mixed = "mixed" in method  # per-module schemes chosen by llmq quantize --target-bpw
        facts = {"kind": "llmq", "method": "mixed" if mixed else method.get("name"),
                 "scheme": f"mixed ({method.get('name')})" if mixed else info["default_scheme"],
                 "bits_per_weight": info["bits_per_weight"], "file_bytes": info["file_bytes"]}  # fmt: skip
        return model, tok, facts
    src = sources.resolve(spec)
    model, config = sources.load_model(src, dtype or torch.float32)
    model.to(device)
    tok, why = sources.load_tokenizer(src)
    if tok is None:
        raise LlmqError(f"{src}: no tokenizer ({why}); perplexity needs one")
    files = [Path(src.path, src.gguf_file)] if src.gguf_file else list(Path(src.path).glob("*.safetensors")) \
        if src.kind == "dir" else []  # fmt: skip
    dt = str(dtype or torch.float32).removeprefix("torch.")
    facts = {"kind": "fp", "method": "fp", "scheme": f"fp ({dt}, dequantized from a .gguf)" if src.gguf_file else
             f"fp ({dt})", "bits_per_weight": None, "file_bytes": sum(f.stat().st_size for f in files) or None,
             "source_format": "gguf" if src.gguf_file else "safetensors"}  # fmt: skip
    return model, tok, facts


def check_args(a) -> None:
    """Every argument that can be wrong, before the model loads."""
    for flag, v, low in (("--seqlen", a.seqlen, 2), ("--stride", a.stride, 1), ("--max-windows", a.max_windows, 1),
                         ("--batch-size", a.batch_size, 1)):  # fmt: skip
        if v is not None and v < low:
            raise LlmqError(f"{flag} {v}: give a value of at least {low}")
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError(f"--device {a.device}: CUDA is not available on this machine; use --device cpu")
    if a.json:
        parent = Path(a.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise LlmqError(f"--json {a.json}: directory {parent} does not exist; create it first")
        if Path(a.json).is_dir():
            raise LlmqError(f"--json {a.json}: is a directory; give a file name, e.g. {Path(a.json) / 'result.json'}")


def evaluate(a) -> dict:
    check_args(a)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text, where = load_text(a.dataset, a.split)  # a bad dataset fails before the model loads
    model, tok, facts = open_model(a.model, device, DTYPES.get(a.dtype) if a.dtype else None)
    sources.check_seqlen(a.seqlen, sources.config_positions(model.config))
    tokens = tokenize_text(tok, text)
    r = perplexity(model, tokens, a.seqlen, a.stride, a.max_windows, a.batch_size, device, quiet=a.quiet)
    record = {
        "label": a.label or (facts["scheme"] if facts["kind"] == "llmq" else
                             "fp (from .gguf)" if facts.get("source_format") == "gguf" else "fp"),
        "model": a.model, **facts,
        "dataset": {"name": a.dataset or "wikitext2", "source": where, "split": a.split, "sha256": text_sha256(text),
                    "tokens": len(tokens)},
        "protocol": {"seqlen": a.seqlen, "stride": a.stride or a.seqlen, "max_windows": a.max_windows,
                     "bos": False, "join": "\\n\\n" if "wiki" in where or a.dataset in (None, "wikitext2") else None,
                     "batch_size": a.batch_size, "definition": "exp(mean NLL over all scored tokens)"},
        **r, "device": str(device), "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "versions": versions(), "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    return record


def print_record(r: dict) -> None:
    bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-"
    print(f"{'model':<40} {'scheme':<22} {'bits/w':>7} {'ppl':>9} {'tokens':>9} {'time':>8}")
    print(f"{str(r['model'])[-40:]:<40} {r['scheme']:<22} {bpw:>7} {r['perplexity']:>9.4f} "
          f"{r['tokens_scored']:>9,} {r['seconds']:>7.1f}s")  # fmt: skip
    print(f"dataset {r['dataset']['name']} ({r['dataset']['split']}, sha256 {r['dataset']['sha256'][:12]}…), "
          f"seqlen {r['protocol']['seqlen']}, stride {r['protocol']['stride']}, {r['windows']} windows")  # fmt: skip
