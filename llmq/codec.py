"""Quantized weights <-> the tensors a checkpoint stores for them, by name (docs/FORMAT.md).

A module NAME quantized whole stores its QuantizedWeight's parts as `NAME.<part>` (`NAME.qweight`, `NAME.scales`,
...); one split by output row stores `NAME.row_part` (uint8 [R]) and each piece's parts under
`NAME.pieces.K.<part>`. `encode` and `decode` are each other's inverse. `layout` gives every stored name's dtype and
shape from the record alone, so `check_headers` can hold a checkpoint's safetensors headers against its config
before a byte of data is read. The rest of a model's state (norms, embeddings, biases) is stored under its own
names, in the storage dtype (`stored_tensors`); the sentinel (llmq/hf.py) sits under the first module's `.weight`.
"""
from __future__ import annotations

from collections import Counter

import torch
from transformers.pytorch_utils import Conv1D

from . import verify
from .config import RowSplit
from .errors import LlmqError
from .qtensor import QuantizedWeight, RowSplitWeight, check_parts
from .record import CheckpointRecord, ModuleRecord

SPLIT_INDEX = "row_part"
PIECES = "pieces"


def piece_prefix(name: str, rec: ModuleRecord, k: int) -> str:
    """Where piece k of module `name` is stored: NAME. (whole) or NAME.pieces.K. (split by row)."""
    return f"{name}.{PIECES}.{k}." if rec.split else f"{name}."


def layout(rec: ModuleRecord) -> dict[str, tuple[torch.dtype, tuple]]:
    """Full tensor name -> (dtype, shape) of everything module `rec` stores except its bias."""
    out = {f"{rec.name}.{SPLIT_INDEX}": (torch.uint8, (rec.shape[0],))} if rec.split else {}
    for k, piece in enumerate(rec.pieces):
        pre = piece_prefix(rec.name, rec, k)
        out |= {pre + suffix: spec for suffix, spec in piece.layout().items()}
    return out


def encode(name: str, qw: QuantizedWeight | RowSplitWeight) -> dict[str, torch.Tensor]:
    """The tensors stored for module `name` (without its bias), once their values are checked: whatever llmq
    writes passes the checks its readers make (llmq/verify.py)."""
    try:
        qw.check_values(name)
    except LlmqError as e:
        what = f"{e.tensor}: {e.found}, expected {e.expected}" if isinstance(e, verify.DamagedValue) else str(e)
        raise LlmqError(f"refusing to write {what} (a bug in llmq, or a damaged source model; nothing of {name} "
                        "was written)") from None  # fmt: skip
    if isinstance(qw, RowSplitWeight):
        out = {f"{name}.{SPLIT_INDEX}": qw.row_part}
        for k, q in enumerate(qw.pieces):
            out |= {f"{name}.{PIECES}.{k}.{s}": v for s, v in q.parts.items()}
        return out
    return {f"{name}.{s}": v for s, v in qw.parts.items()}


def module_keys(rec: ModuleRecord, keys) -> list[str]:
    """The checkpoint keys under module `rec`'s name that are its stored parts (leaving out its bias, the sentinel
    under `NAME.weight` and any child module's tensors); a stray key there is caught by `decode`."""
    pre = f"{rec.name}."
    own = []
    for k in keys:
        if not k.startswith(pre) or k in (f"{pre}weight", f"{pre}bias"):
            continue
        rest = k[len(pre):]
        if "." not in rest or (rec.split and rest.startswith(f"{PIECES}.")):
            own.append(k)
    return own


def decode(rec: ModuleRecord, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | RowSplitWeight:
    """Module `rec`'s weight from its stored tensors (full names, as `module_keys` selects them), checked against
    the record: every tensor present with the dtype and shape the record implies, and nothing else."""
    found = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    check_parts(rec.name, _relative(rec.name, layout(rec)), _relative(rec.name, found))
    if not rec.split:
        pre = f"{rec.name}."
        return QuantizedWeight.from_tensors({k[len(pre):]: v for k, v in tensors.items()}, rec.shape, rec.scheme,
                                            rec.name)  # fmt: skip
    part = tensors[f"{rec.name}.{SPLIT_INDEX}"]
    check_row_part(rec, part)
    split = RowSplit(rec.schemes, tuple(part.tolist()))
    pieces = []
    for k, piece in enumerate(rec.pieces):
        pre = piece_prefix(rec.name, rec, k)
        own = {key[len(pre):]: v for key, v in tensors.items() if key.startswith(pre)}
        pieces.append(QuantizedWeight.from_tensors(own, piece.shape, piece.scheme, pre[:-1]))
    return RowSplitWeight(rec.shape, split, pieces)


def check_row_part(rec: ModuleRecord, part: torch.Tensor) -> None:
    """A split module's row_part puts every row in exactly one piece, as many rows in each as config.json says."""
    tensor, want = f"{rec.name}.{SPLIT_INDEX}", [p.shape[0] for p in rec.pieces]
    bad = part.long() >= len(rec.pieces)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise verify.DamagedValue(tensor, f"piece {int(part[i])} at position [{i}]", f"a piece in 0..{len(want) - 1}")
    counts = torch.bincount(part.long(), minlength=len(rec.pieces)).tolist()
    if counts != want:
        raise verify.DamagedValue(tensor, f"rows per piece {counts}", f"{want} (config.json)")


def _relative(name: str, d: dict) -> dict:
    pre = f"{name}."
    return {k[len(pre):]: v for k, v in d.items()}


def check_headers(record: CheckpointRecord, headers: dict[str, tuple], where: str) -> set[str]:
    """Hold every quantized module's stored tensors (from the safetensors headers: name -> (dtype, shape, ...))
    against the record, before any data is read. Returns the names the quantized modules own."""
    owned = set()
    for rec in record.modules.values():
        keys = module_keys(rec, headers)
        found = {k[len(rec.name) + 1:]: (headers[k][0], headers[k][1]) for k in keys}
        check_parts(rec.name, _relative(rec.name, layout(rec)), found, f"(in {where})")
        owned |= set(keys)
    return owned


# ---- whole models -------------------------------------------------------------------------------
def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def sentinel_tensor(first_module: str) -> dict[str, torch.Tensor]:
    """See llmq/hf.py: makes plain transformers refuse to load an llmq checkpoint without llmq imported."""
    return {f"{first_module}.weight": torch.zeros(0, dtype=torch.uint8)}


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates (e.g. lm_head.weight = embed_tokens.weight) dropped."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def stored_tensors(state: dict[str, torch.Tensor], qweights: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the checkpoint holds for `state` (part of a state dict): quantized modules' packed parts instead
    of their weights, every other float tensor in the storage `dtype`."""
    out = {}
    for name, qw in qweights.items():
        out |= encode(name, qw)
    skip = {f"{n}.weight" for n in qweights}
    for k, v in state.items():
        if k not in skip:
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def checkpoint_tensors(model, qweights: dict, dtype: torch.dtype):
    """Yield (name -> tensor) chunks to store for an in-memory model."""
    if qweights:
        yield sentinel_tensor(next(iter(qweights)))
    state = unique_state(model)
    for name, qw in qweights.items():
        part = {k: state.pop(k) for k in (f"{name}.weight", f"{name}.bias") if k in state}
        yield stored_tensors(part, {name: qw}, dtype)
    yield stored_tensors(state, {}, dtype)


def verify_values(reader, record: CheckpointRecord) -> None:
    """The value checks of llmq/verify.py on a checkpoint read through `reader` (checkpoint.CheckpointReader), for
    the paths that do not build a model (inspect, export): every quantized module's scales, outliers, indices
    (perm, the outliers' CSR, row_part) and llama.cpp block parameters (its codes are read only where those live
    among them), and every full-precision tensor. Each shard is opened once; a module is checked as soon as all of
    its parts are read. Errors name the file, the tensor, the first bad position and what was expected."""
    owner: dict[str, ModuleRecord | None] = {}  # stored key -> its module, None: full precision (codes left out
    # unless they hold block scales)
    for k in reader.weight_map:
        rec = _module_of(record, k)
        if rec is not None and (not k.endswith(".qweight") or any(p.scheme.block is not None for p in rec.pieces)):
            owner[k] = rec
        elif rec is None and k != record.sentinel:
            owner[k] = None  # a full-precision tensor
    pending = Counter(r.name for r in owner.values() if r is not None)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    by_shard: dict[str, list[str]] = {}
    for k in owner:
        by_shard.setdefault(reader.weight_map[k], []).append(k)
    try:
        for names in by_shard.values():
            for k, t in reader.load(names).items():
                rec = owner[k]
                if rec is None:
                    verify.finite(k, t)
                    continue
                parts.setdefault(rec.name, {})[k] = t
                pending[rec.name] -= 1
                if pending[rec.name] == 0:
                    _check_module_values(rec, parts.pop(rec.name))
    except verify.DamagedValue as e:
        raise e.located(reader.dir / reader.weight_map.get(e.tensor, "")) from None


def _module_of(record: CheckpointRecord, key: str) -> ModuleRecord | None:
    """The quantized module whose stored part `key` is (NAME.part, or NAME.pieces.K.part / NAME.row_part)."""
    name, _, part = key.rpartition(".")
    rec = record.modules.get(name)
    if rec is not None:
        return rec if part not in ("weight", "bias") else None
    base = name.rsplit(".", 2)
    rec = record.modules.get(base[0]) if len(base) == 3 and base[1] == PIECES else None
    return rec if rec is not None and rec.split else None


def _check_module_values(rec: ModuleRecord, t: dict[str, torch.Tensor]) -> None:
    if rec.split:
        check_row_part(rec, t[f"{rec.name}.{SPLIT_INDEX}"])
    for k, piece in enumerate(rec.pieces):
        pre = piece_prefix(rec.name, rec, k)
        own = {key[len(pre):]: v for key, v in t.items() if key.startswith(pre) and "." not in key[len(pre):]}
        QuantizedWeight(piece.shape, piece.scheme, own).check_values(pre[:-1])
