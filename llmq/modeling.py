"""Whole models in memory: quantized weights -> checkpoint dir (`save_quantized`), fake quantization, and
`load_quantized` (transformers' from_pretrained through llmq's loader, llmq/hf.py, plus the shard checksums)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from . import codec, record
from .archs import arch_for
from .checkpoint import CheckpointWriter
from .config import QuantPlan
from .hf import VERIFY
from .nn import set_backend
from .qtensor import QuantizedWeight, RowSplitWeight


def save_quantized(
    model, qweights: dict[str, QuantizedWeight | RowSplitWeight], out: Path, plan: QuantPlan, method: dict,
    dtype: torch.dtype = torch.float16, tokenizer=None, max_shard_bytes: int | None = None,
) -> list[Path]:  # fmt: skip
    """Write a complete v1 checkpoint into the (prepared, empty) dir `out`."""
    out = Path(out)
    writer = CheckpointWriter(out, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    for chunk in codec.checkpoint_tensors(model, qweights, dtype):
        writer.add(chunk)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    not_converted = [n for n in codec.linear_names(model) if n not in qweights]
    modules = {n: record.ModuleRecord.of(n, q) for n, q in qweights.items()}
    rec = record.CheckpointRecord.build(plan, modules, not_converted, method)
    return writer.finish(rec.model_config(model.config.to_dict(), str(dtype).removeprefix("torch.")))


def fake_quantize(model, qweights: dict[str, QuantizedWeight], dtype: torch.dtype = torch.float16):
    """In place: quantized linears get their dequantized weights, every other float tensor is rounded
    through `dtype` (the checkpoint's storage dtype), so the model computes what the checkpoint holds."""
    spec = arch_for(model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.to(dtype).to(p.dtype))
        for name, qw in qweights.items():
            m = model.get_submodule(name)
            W = qw.dequantize(m.weight.dtype)
            m.weight.copy_(W.t() if spec.transposed else W)
    return model


def load_quantized(d, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   backend: str = "auto", verify: bool = True):  # fmt: skip
    """A working transformers model from an llmq checkpoint dir (QuantLinear in place of quantized linears).

    The same loader as `AutoModelForCausalLM.from_pretrained(d)` after `import llmq`, which checks every shard listed
    in the index (present, readable, its sha256 against the index), the shards' headers against config.json, and
    that no tensor is missing; this adds the record check first (an interrupted conversion's dir says so) and
    verify=False skips the hashing.
    dtype: activation / full-precision dtype; default float32 on CPU, float16 on CUDA.
    backend: for every QuantLinear ("auto" also honours $LLMQ_BACKEND).
    """
    d = Path(d)
    record.read(d)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    token = VERIFY.set(verify)  # the HF hook checks shards, checksums and headers (llmq/hf.py)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    finally:
        VERIFY.reset(token)
    if backend != "auto":
        set_backend(model, backend)
    return model.to(device).eval()
