"""The checkpoint record: what config.json's `quantization_config` says about a checkpoint, parsed and checked once.

`CheckpointRecord.from_config` is the only code that reads `quantization_config` keys, and `to_config` the only
code that writes them (docs/FORMAT.md has the layout). Every reader — the transformers loader, `load_quantized`,
`llmq inspect`, `llmq eval`, the plots, a resumed conversion, the exporters — gets the record and asks it: which
modules are quantized, each module's stored weights (`ModuleRecord.pieces`: one `WeightRecord` for a module
quantized whole, one per scheme for a module split by output row) with their schemes, shapes, outlier counts and
permutations, the sentinel, the modules left in full precision, and how the checkpoint was made (`method`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM_NAMES

from .checkpoint import FORMAT_VERSION, PART_PREFIX, PROGRESS_NAME
from .config import QuantPlan, QuantScheme
from .errors import LlmqError
from .qtensor import QuantizedWeight, RowSplitWeight, expected_layout, layout_nbytes
from .version import __version__

QUANT_METHOD = "llmq"


@dataclass(frozen=True)
class WeightRecord:
    """One stored quantized weight: a module quantized whole, or one piece of a module split by output row."""

    scheme: QuantScheme
    shape: tuple[int, int]  # [out, in] of this weight (a piece: its rows)
    nnz: int = 0  # outliers stored exactly
    permuted: bool = False  # a `perm` is stored (act-order without static groups)

    def layout(self) -> dict[str, tuple[torch.dtype, tuple]]:
        """suffix -> (dtype, shape) of every tensor stored for this weight."""
        return expected_layout(self.shape, self.scheme, self.nnz, self.permuted)

    def nbytes(self) -> int:
        """Stored bytes (QuantizedWeight.nbytes() of the weight it describes)."""
        return layout_nbytes(self.layout())

    @classmethod
    def of(cls, qw: QuantizedWeight) -> "WeightRecord":
        nnz = int(qw.parts["outlier_val"].numel()) if "outlier_val" in qw.parts else 0
        return cls(qw.scheme, tuple(qw.shape), nnz, qw.perm is not None)


@dataclass(frozen=True)
class ModuleRecord:
    """A quantized module: its [out, in] shape and its stored weights (one, or one per scheme when `split`)."""

    name: str
    shape: tuple[int, int]
    pieces: tuple[WeightRecord, ...]
    split: bool = False  # stored by output row: NAME.row_part + NAME.pieces.K.* (llmq/codec.py)

    @property
    def scheme(self) -> QuantScheme | None:
        """The scheme of a module quantized whole (None when split)."""
        return None if self.split else self.pieces[0].scheme

    @property
    def schemes(self) -> tuple[QuantScheme, ...]:
        return tuple(p.scheme for p in self.pieces)

    def nbytes(self) -> int:
        """Stored bytes, bias left out: the pieces', plus the row index of a split module."""
        return sum(p.nbytes() for p in self.pieces) + (self.shape[0] if self.split else 0)

    def describe(self) -> str:
        """'int4-asym-g128', or for a split module 'rows: int2-g32-dq 120, nf3-g128-dq 400, ...'."""
        if not self.split:
            return self.pieces[0].scheme.describe()
        return "rows: " + ", ".join(f"{p.scheme.describe()} {p.shape[0]}" for p in self.pieces)

    @classmethod
    def of(cls, name: str, qw: QuantizedWeight | RowSplitWeight) -> "ModuleRecord":
        if isinstance(qw, RowSplitWeight):
            return cls(name, tuple(qw.shape), tuple(WeightRecord.of(q) for q in qw.pieces), True)
        return cls(name, tuple(qw.shape), (WeightRecord.of(qw),))

    def to_dict(self) -> dict:
        """For llmq quantize's progress manifest (config.json keeps its own layout: CheckpointRecord.to_config)."""
        return {"shape": list(self.shape), "split": self.split,
                "pieces": [{"scheme": p.scheme.to_dict(), "shape": list(p.shape), "nnz": p.nnz,
                            "permuted": p.permuted} for p in self.pieces]}  # fmt: skip

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ModuleRecord":
        pieces = tuple(WeightRecord(QuantScheme.from_dict(p["scheme"]), tuple(p["shape"]), p["nnz"], p["permuted"])
                       for p in d["pieces"])  # fmt: skip
        return cls(name, tuple(d["shape"]), pieces, d["split"])


@dataclass(frozen=True)
class CheckpointRecord:
    """The quantization of a checkpoint (docs/FORMAT.md, `quantization_config`)."""

    default: QuantScheme
    overrides: dict[str, QuantScheme]  # as written: modules whose scheme differs from the default
    modules: dict[str, ModuleRecord]  # every quantized module, in layer order
    not_converted: tuple[str, ...] = ()  # linears left in full precision
    method: dict[str, Any] = field(default_factory=dict)  # how it was made: {"name": "rtn"|"gptq", ...}
    sentinel: str | None = None  # see llmq/hf.py
    llmq_version: str = __version__

    @classmethod
    def build(cls, plan: QuantPlan, modules: dict[str, ModuleRecord], not_converted, method: dict) -> "CheckpointRecord":
        """The record of a conversion: `modules` in layer order, each whole module quantized with its plan's scheme."""
        for name, m in modules.items():
            if not m.split and m.scheme != plan.scheme_for(name):
                raise ValueError(f"{name} was quantized with {m.scheme.describe()}, its plan says "
                                 f"{plan.scheme_for(name).describe()}")  # fmt: skip
        sentinel = f"{next(iter(modules))}.weight" if modules else None
        return cls(plan.default, dict(plan.overrides), dict(modules), tuple(not_converted), dict(method), sentinel)

    def model_config(self, config: dict, dtype: str) -> dict:
        """config.json of a checkpoint: the model's config, the storage dtype of its full-precision tensors, and
        this record as its `quantization_config`."""
        return model_config(config, self.to_config(), dtype)

    @property
    def plan(self) -> QuantPlan:
        """Default scheme and overrides (modules split by row are described by their records, not by a plan)."""
        return QuantPlan(self.default, dict(self.overrides))

    def to_config(self) -> dict:
        """config.json's `quantization_config` (docs/FORMAT.md); `from_config` reads it back."""
        whole = {n: m.pieces[0] for n, m in self.modules.items() if not m.split}
        splits = {n: {"schemes": [p.scheme.to_dict() for p in m.pieces], "rows": [p.shape[0] for p in m.pieces],
                      "outlier_nnz": [p.nnz for p in m.pieces], "permuted": [p.permuted for p in m.pieces]}
                  for n, m in self.modules.items() if m.split}  # fmt: skip
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "llmq_version": self.llmq_version,
            "scheme": self.default.to_dict(),
            "overrides": {k: v.to_dict() for k, v in sorted(self.overrides.items())},
            "quantized_modules": list(self.modules),
            "shapes": {n: list(m.shape) for n, m in self.modules.items()},
            "outlier_nnz": {n: w.nnz for n, w in whole.items() if w.nnz},
            "permuted_modules": [n for n, w in whole.items() if w.permuted],
            "sentinel": self.sentinel,
            "modules_not_converted": list(self.not_converted),
            "method": self.method,
        } | ({"row_splits": splits} if splits else {})

    @classmethod
    def from_config(cls, qc: Any, where: str = "") -> "CheckpointRecord":
        """Parse and check a `quantization_config` dict; an LlmqError (prefixed with `where`) says what is wrong."""
        pre = f"{where}: " if where else ""
        if not is_llmq_quantization_config(qc):
            raise LlmqError(f"{pre}config.json has no llmq quantization_config; is this a quantized llmq checkpoint?")
        v = qc.get("format_version")
        if v != FORMAT_VERSION:
            raise LlmqError(f"{pre}llmq checkpoint format_version {v!r}, this llmq reads version {FORMAT_VERSION}; "
                            "upgrade llmq (pip install -U llmq) or re-quantize")  # fmt: skip
        try:
            return _parse(qc)
        except LlmqError as e:
            raise LlmqError(f"{pre}config.json quantization_config: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LlmqError(f"{pre}config.json quantization_config is damaged ({type(e).__name__}: {e}); "
                            "re-quantize or restore config.json") from None  # fmt: skip


def _shape(x) -> tuple[int, int]:
    if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(n, int) and n > 0 for n in x)):
        raise LlmqError(f"shape {x!r} is not [out_features, in_features]")
    return (x[0], x[1])


def _parse(qc: dict) -> CheckpointRecord:
    default = QuantScheme.from_dict(qc["scheme"])
    overrides = {str(k): QuantScheme.from_dict(v) for k, v in qc.get("overrides", {}).items()}
    nnz, permuted, splits = qc.get("outlier_nnz", {}), set(qc.get("permuted_modules", [])), qc.get("row_splits", {})
    names = [str(n) for n in qc["quantized_modules"]]
    unknown = (set(nnz) | permuted | set(splits)) - set(names)
    if unknown:
        raise LlmqError(f"module(s) {sorted(unknown)[:3]} are described but not in quantized_modules")
    modules = {}
    for name in names:
        shape = _shape(qc["shapes"][name])
        if name not in splits:
            scheme = overrides.get(name, default)
            modules[name] = ModuleRecord(name, shape, (WeightRecord(scheme, shape, _count(nnz.get(name, 0), scheme),
                                                                    name in permuted),))  # fmt: skip
            continue
        sp = splits[name]
        schemes = [QuantScheme.from_dict(d) for d in sp["schemes"]]
        rows, counts, perms = list(sp["rows"]), list(sp["outlier_nnz"]), list(sp["permuted"])
        if not (len(schemes) == len(rows) == len(counts) == len(perms) >= 1) or sum(rows) != shape[0] or min(rows) < 1:
            raise LlmqError(f"{name}: row_splits lists {len(schemes)} schemes and rows {rows} for {shape[0]} rows")
        pieces = tuple(WeightRecord(s, (r, shape[1]), _count(c, s), bool(p)) for s, r, c, p in zip(schemes, rows, counts, perms))
        modules[name] = ModuleRecord(name, shape, pieces, True)
    sentinel = qc.get("sentinel")
    if sentinel is not None and not isinstance(sentinel, str):
        raise LlmqError(f"sentinel {sentinel!r} is not a tensor name")
    return CheckpointRecord(default, overrides, modules, tuple(qc.get("modules_not_converted", [])),
                            dict(qc.get("method") or {}), sentinel, str(qc.get("llmq_version", "")))  # fmt: skip


def _count(n, scheme: QuantScheme) -> int:
    if not isinstance(n, int) or n < 0 or (n and scheme.outliers == 0):
        raise LlmqError(f"outlier count {n!r} does not fit scheme {scheme.describe()}")
    return n


def is_llmq_quantization_config(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def describes_checkpoint(qc: dict) -> bool:
    """Is this `quantization_config` a checkpoint's record (rather than a request to quantize at load time)?"""
    return "quantized_modules" in qc


HEADER_KEYS = ("quant_method", "format_version")  # what every llmq quantization_config carries besides its body


def is_llmq_dir(out: Path) -> bool:
    """Does `out` hold an llmq checkpoint, complete or interrupted (a progress manifest or part files)?"""
    out = Path(out)
    if (out / PROGRESS_NAME).exists() or any(out.glob(f"{PART_PREFIX}*")):
        return True
    try:
        return is_llmq_quantization_config(json.loads((out / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError, AttributeError):
        return False


def model_config(config: dict, quantization_config: dict, dtype: str) -> dict:
    """config.json of a quantized model (llmq's, or an export's with the target's quantization_config). A source that
    left `architectures` null (e.g. a .gguf through transformers) gets its causal-LM class: engines dispatch on it."""
    out = config | {"dtype": dtype, "quantization_config": quantization_config}
    if not out.get("architectures") and out.get("model_type") in CAUSAL_LM_NAMES:
        out["architectures"] = [CAUSAL_LM_NAMES[out["model_type"]]]
    return out


def without_record(config: dict) -> dict:
    """config.json of the model itself: what remains without llmq's quantization_config."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


INTERRUPTED = "interrupted"  # the key of a placeholder config.json's quantization_config
INTERRUPTED_MESSAGE = "an interrupted conversion, not a complete llmq checkpoint: rerun the same `llmq quantize` " \
    "command to resume it"  # fmt: skip


def placeholder_config(model_config: dict) -> dict:
    """The config.json an output dir holds while a conversion runs (and after it fails): the model's type, so that
    transformers reaches llmq's quantizer, and a quantization_config that refuses to load, saying why. The real
    config.json replaces it last (checkpoint.CheckpointWriter.finish)."""
    keep = {k: model_config[k] for k in ("model_type", "architectures") if model_config.get(k)}
    return keep | {"quantization_config": {"quant_method": QUANT_METHOD, INTERRUPTED: True}}


def is_placeholder(qc) -> bool:
    return isinstance(qc, dict) and qc.get(INTERRUPTED) is True


def complete_config(out: Path) -> dict | None:
    """config.json of `out` when it is a finished conversion's (readable, not the placeholder); else None."""
    try:
        cfg = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and not is_placeholder(cfg.get("quantization_config")) else None


def read(d: Path) -> tuple[dict, CheckpointRecord]:
    """(config.json as a dict, the checkpoint's record) of an llmq checkpoint dir."""
    d = Path(d)
    if not d.is_dir():
        raise LlmqError(f"{d}: no such directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise LlmqError(f"{d}: no config.json; " + (INTERRUPTED_MESSAGE if is_llmq_dir(d) else
                                                     "not a complete llmq checkpoint"))  # fmt: skip
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LlmqError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlmqError(f"{cfg_path}: not a JSON object")
    if is_placeholder(config.get("quantization_config")):
        raise LlmqError(f"{d}: {INTERRUPTED_MESSAGE}")
    return config, CheckpointRecord.from_config(config.get("quantization_config"), str(d))
