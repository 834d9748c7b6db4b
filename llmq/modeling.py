"""Whole models: quantized weights -> checkpoint dir, checkpoint dir -> working transformers model."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import __version__
from .archs import arch_for
from .checkpoint import FORMAT_VERSION, QUANT_METHOD, CheckpointReader, CheckpointWriter, read_config
from .config import QuantPlan, QuantScheme
from .errors import LlmqError
from .nn import QuantLinear, RowSplitLinear
from .qtensor import QuantizedWeight, RowSplitWeight

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def module_facts(qw: QuantizedWeight | RowSplitWeight) -> dict:
    """What config.json records of one quantized module (enough to rebuild its QuantLinear skeleton)."""
    if isinstance(qw, RowSplitWeight):
        pieces = [module_facts(q) for q in qw.pieces]
        split = {"schemes": [s.to_dict() for s in qw.split.schemes], "rows": [q.shape[0] for q in qw.pieces],
                 "outlier_nnz": [f["nnz"] for f in pieces], "permuted": [f["perm"] for f in pieces]}  # fmt: skip
        return {"shape": list(qw.shape), "nnz": 0, "perm": False, "bytes": qw.nbytes(), "split": split}
    return {"shape": list(qw.shape), "nnz": int(qw.parts["outlier_val"].numel()) if "outlier_val" in qw.parts else 0,
            "perm": qw.perm is not None, "bytes": qw.nbytes()}  # fmt: skip


def quantization_config(plan: QuantPlan, facts: dict[str, dict], not_converted: list[str], method: dict) -> dict:
    """`facts`: module name -> module_facts(...), in layer order."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmq_version": __version__,
        "scheme": plan.default.to_dict(),
        "overrides": {k: v.to_dict() for k, v in sorted(plan.overrides.items())},
        "quantized_modules": list(facts),
        "shapes": {k: f["shape"] for k, f in facts.items()},
        "outlier_nnz": {k: f["nnz"] for k, f in facts.items() if f["nnz"]},
        "permuted_modules": [k for k, f in facts.items() if f["perm"]],
        "sentinel": f"{next(iter(facts))}.weight" if facts else None,
        "modules_not_converted": not_converted,
        "method": method,
    } | ({"row_splits": splits} if (splits := {k: f["split"] for k, f in facts.items() if "split" in f}) else {})


def plan_from_config(qc: dict) -> QuantPlan:
    return QuantPlan(
        QuantScheme.from_dict(qc["scheme"]), {k: QuantScheme.from_dict(v) for k, v in qc.get("overrides", {}).items()}
    )


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates (e.g. lm_head.weight = embed_tokens.weight) dropped."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def linear_names(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def sentinel_tensor(first_module: str) -> dict[str, torch.Tensor]:
    """See llmq/hf.py: makes plain transformers refuse to load an llmq checkpoint without llmq imported."""
    return {f"{first_module}.weight": torch.zeros(0, dtype=torch.uint8)}


def stored_tensors(state: dict[str, torch.Tensor], qweights: dict, dtype: torch.dtype) -> dict:
    """What the checkpoint holds for `state` (part of a state dict): quantized modules' packed parts instead
    of their weights, every other float tensor in the storage `dtype`."""
    out = {}
    for name, qw in qweights.items():
        out |= qw.tensors(name)
    skip = {f"{n}.weight" for n in qweights}
    for k, v in state.items():
        if k not in skip:
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def checkpoint_tensors(model, qweights: dict[str, QuantizedWeight], dtype: torch.dtype):
    """Yield (name -> tensor) chunks to store for an in-memory model."""
    if qweights:
        yield sentinel_tensor(next(iter(qweights)))
    state = _unique_state(model)
    for name, qw in qweights.items():
        part = {k: state.pop(k) for k in (f"{name}.weight", f"{name}.bias") if k in state}
        yield stored_tensors(part, {name: qw}, dtype)
    yield stored_tensors(state, {}, dtype)


def save_quantized(
    model, qweights: dict[str, QuantizedWeight], out: Path, plan: QuantPlan, method: dict,
    dtype: torch.dtype = torch.float16, tokenizer=None, max_shard_bytes: int | None = None,
) -> list[Path]:  # fmt: skip
    """Write a complete v1 checkpoint into the (prepared, empty) dir `out`."""
    out = Path(out)
    writer = CheckpointWriter(out, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    for chunk in checkpoint_tensors(model, qweights, dtype):
        writer.add(chunk)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    not_converted = [n for n in linear_names(model) if n not in qweights]
    facts = {n: module_facts(q) for n, q in qweights.items()}
    config["quantization_config"] = quantization_config(plan, facts, not_converted, method)
    return writer.finish(config)


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

    dtype: activation / full-precision dtype; default float32 on CPU, float16 on CUDA.
    verify: check each shard's sha256 against the index (catches corrupted files).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(d)
    raw, qc = read_config(d)
    plan = plan_from_config(qc)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    reader = CheckpointReader(d, verify=verify)
    config = AutoConfig.from_pretrained(d)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = arch_for(config)
    splits = qc.get("row_splits", {})
    for name in qc["quantized_modules"]:
        _install(model, name, reader, plan.scheme_for(name), qc["shapes"][name], spec.transposed, dtype, backend,
                 splits.get(name))  # fmt: skip
    _load_rest(model, reader, set(qc["quantized_modules"]), dtype, qc.get("sentinel"))
    return model.to(device).eval()


def split_schemes(name: str, rec: dict, shape) -> list[QuantScheme]:
    """The schemes of a row-split module from its config record, checked against its row counts."""
    schemes = [QuantScheme.from_dict(d) for d in rec["schemes"]]
    rows = rec.get("rows", [])
    if len(rows) != len(schemes) or sum(rows) != shape[0]:
        raise LlmqError(f"{name}: row_splits lists {len(schemes)} schemes and rows {rows} for {shape[0]} rows; "
                        "config.json is damaged, re-quantize")  # fmt: skip
    return schemes


def module_keys(name: str, keys, split: bool) -> list[str]:
    """The checkpoint keys that belong to quantized module `name` (its parts and bias; a row-split module's
    pieces too), leaving out the sentinel under `name.weight` and any child module's tensors."""
    prefix = f"{name}."
    return [k for k in keys if k.startswith(prefix) and k != f"{name}.weight"
            and ("." not in k[len(prefix):] or (split and k.startswith(f"{prefix}pieces.")))]  # fmt: skip


def owned_by(key: str, quantized: set[str]) -> bool:
    """Is checkpoint tensor `key` a stored part of a quantized module (its own, or a row-split piece's)?"""
    return key.rpartition(".")[0] in quantized or key.split(".pieces.")[0] in quantized


def _install(model, name, reader, scheme, qc_shape, transposed, dtype, backend, split: dict | None = None) -> None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise LlmqError(f"quantized module {name!r} does not exist in the model built from config.json") from None
    shape = (mod.weight.shape[1], mod.weight.shape[0]) if transposed else tuple(mod.weight.shape)
    if list(shape) != list(qc_shape):
        raise LlmqError(f"{name}: checkpoint shape {list(qc_shape)} does not match the model's {list(shape)}")
    prefix = f"{name}."
    tensors = reader.load(module_keys(name, reader.keys(), split is not None))
    parts = {k[len(prefix):]: v for k, v in tensors.items() if k != f"{name}.bias"}
    bias = tensors.get(f"{name}.bias")
    if (bias is None) != (mod.bias is None):
        raise LlmqError(f"{name}.bias: {'missing from' if bias is None else 'unexpected in'} the checkpoint")
    parent, _, child = name.rpartition(".")
    bias = None if bias is None else bias.to(dtype)
    if split is not None:
        qw = RowSplitWeight.from_tensors(parts, shape, split_schemes(name, split, shape), name)
        q = RowSplitLinear(qw, bias, backend=backend)
    else:
        q = QuantLinear(QuantizedWeight.from_tensors(parts, shape, scheme, name), bias, backend=backend)
    q.prepare(name)
    setattr(model.get_submodule(parent), child, q)


def _load_rest(model, reader: CheckpointReader, quantized: set[str], dtype: torch.dtype, sentinel: str | None) -> None:
    qparts = {k for k in reader.keys() if owned_by(k, quantized) and k != sentinel}
    want = [k for k, v in model.state_dict().items() if k not in qparts and v.is_meta]
    available = [k for k in want if k in reader.weight_map]
    tensors = reader.load(available)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise LlmqError(f"{reader.dir}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")
    unexpected = set(reader.keys()) - qparts - set(model.state_dict()) - {sentinel}
    if unexpected:
        raise LlmqError(f"{reader.dir}: unexpected tensor(s) {sorted(unexpected)[:5]}; the checkpoint does not match config.json")
