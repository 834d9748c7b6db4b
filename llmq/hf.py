"""transformers integration: `quant_method: "llmq"` registered with transformers' own registries.

`import llmq` registers `LlmqConfig` and `LlmqHfQuantizer` (transformers.quantizers.register_*), so that
  - `AutoModelForCausalLM.from_pretrained(llmq_dir)` builds QuantLinear skeletons (packed buffers of the
    stored dtypes and shapes, on the meta device) before the weights load, and the loader fills them from
    the shards: full-precision weights of quantized layers are never materialised;
  - `from_pretrained(fp_model, quantization_config=LlmqConfig(method="rtn"|"nf4"|..., ...))` quantizes each
    linear's weight as it arrives (a ConversionOps), so peak memory stays near the quantized size.

Loading a checkpoint reads its CheckpointRecord (llmq/record.py) once, builds one skeleton per quantized module from
it (nn.skeleton), and holds the shards' headers against it before a byte of data is read (check_checkpoint).
`llmq.load_quantized` is this same loader plus the shard checksums.

Safety: every llmq checkpoint carries a sentinel tensor under the real name of its first quantized
module's `.weight`, with shape [0]. Without llmq imported, transformers only warns about the unknown
quant_method; the sentinel then makes it raise (size mismatch) instead of building a model with random
weights. With llmq imported that module is a QuantLinear, and the key is ignored.
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import codec, formats, moe, nn, verify
from .algorithms.rtn import rtn
from .archs import arch_for, linear_shapes_of, weight_of
from .checkpoint import SHARD_METADATA, CheckpointReader, tensor_headers
from .config import QuantPlan, QuantScheme
from .dtypes import DTYPES
from .errors import LlmqError
from .pipeline import check_finite
from .recipes import resolve_shapes
from .record import (HEADER_KEYS, INTERRUPTED_MESSAGE, QUANT_METHOD, CheckpointRecord, ModuleRecord, WeightRecord,
                     describes_checkpoint, is_placeholder)

log = logging.getLogger("llmq")
SCHEME_KEYS = tuple(f.name for f in dataclasses.fields(QuantScheme))


# whether loading a checkpoint hashes its shards against the index (llmq.load_quantized(verify=False) clears it)
VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("llmq_verify", default=True)


@register_quantization_config(QUANT_METHOD)
class LlmqConfig(QuantizationConfigMixin):
    """Either the `quantization_config` of an llmq checkpoint (pre-quantized: parsed into a CheckpointRecord), or a
    request to quantize at load time: LlmqConfig(method="rtn" | a codebook format's name (e.g. "nf4"),
    bits=4, group_size=128, sym=False, double_quant=False, ...); a codebook method defaults to group_size=64.

    backend: "auto" | "reference" | "cpu" | "triton" for the QuantLinear layers quantized on the fly. For a
    pre-quantized checkpoint transformers ignores a passed config (it keeps the checkpoint's); set
    LLMQ_BACKEND before loading, or call llmq.set_backend(model, name) after."""

    def __init__(self, method: str | dict = "rtn", backend: str = "auto", modules_to_not_convert=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.backend = backend
        self.modules_to_not_convert = modules_to_not_convert
        if is_placeholder(kwargs):  # config.json of a conversion that has not finished
            raise LlmqError(INTERRUPTED_MESSAGE)
        self.pre = describes_checkpoint(kwargs)  # the dict read from a checkpoint's config.json
        if self.pre:
            self.record = CheckpointRecord.from_config({**kwargs, "method": method, "quant_method": QUANT_METHOD})
            return
        name = method if isinstance(method, str) else method.get("name")
        if name == "gptq":
            raise LlmqError("GPTQ needs calibration data and cannot run inside from_pretrained; quantize offline "
                            "with `llmq quantize MODEL OUT --method gptq --calib ...`, then load OUT")  # fmt: skip
        methods = ("rtn", *formats.codebook_formats())
        if name not in methods:
            raise LlmqError(f"LlmqConfig(method={name!r}): on-the-fly quantization supports {', '.join(map(repr, methods))}")
        scheme = {k: v for k, v in kwargs.items() if k in SCHEME_KEYS}
        unknown = set(kwargs) - set(SCHEME_KEYS) - set(HEADER_KEYS)
        if unknown:
            raise LlmqError(f"LlmqConfig: unknown options {sorted(unknown)}; scheme options are {SCHEME_KEYS}")
        if name != "rtn":  # round-to-nearest onto that codebook
            scheme.setdefault("format", name)
            scheme.setdefault("group_size", 64)
        self.scheme = QuantScheme(**scheme)
        self.record: CheckpointRecord | None = None

    def get_loading_attributes(self) -> dict:
        return {"backend": self.backend}

    def to_dict(self) -> dict:
        if self.record is not None:
            return self.record.to_config()
        return {"quant_method": QUANT_METHOD, "method": {"name": "rtn"}, "scheme": self.scheme.to_dict()}


class LlmqQuantize(ConversionOps):
    """On-the-fly RTN: one full-precision weight in, the QuantLinear's packed parts out."""

    def __init__(self, hf_quantizer: "LlmqHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            name = key.rpartition(".")[0]
            W = value.t() if self.hf_quantizer.transposed else value
            try:  # a NaN/Inf weight would quantize to NaN or garbage, silently
                check_finite(W, name)
            except LlmqError as e:  # transformers would fold an error raised here into its own report: raise it
                self.hf_quantizer.errors.append(e)  # after loading (_process_model_after_weight_loading)
                W = torch.zeros_like(W)
            qw = rtn(W.to(torch.float32), self.hf_quantizer.plan.scheme_for(name))
            out |= {k: v.to(value.device) for k, v in codec.encode(name, qw).items()}
            if missing_keys is not None:
                missing_keys.discard(key)  # consumed: it became the packed parts
        return out


@register_quantizer(QUANT_METHOD)
class LlmqHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: LlmqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.transposed = False
        self.modules: dict[str, ModuleRecord] = {}
        self.verify_values, self.shards = False, None  # a pre-quantized checkpoint's reader, once opened
        self.errors: list[LlmqError] = []  # found while quantizing on the fly
        self.experts: dict[str, tuple[int, int]] = {}  # expert linears quantized on the fly once loaded
        qc = quantization_config
        if self.pre_quantized and not qc.pre:
            raise LlmqError("this checkpoint's quantization_config is not a complete llmq config; re-save it with llmq")
        self.plan = qc.record.plan if self.pre_quantized else QuantPlan(qc.scheme)

    def update_dtype(self, dtype):
        return dtype if dtype is not None else torch.float32

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """QuantLinear's forward traces without graph breaks (backends keep shapes as Python ints), so
        generate() may torch.compile the model with a static KV cache."""
        return True

    # ---- on the fly ---------------------------------------------------------------------------
    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return not self.pre_quantized and param_name.rpartition(".")[0] in self.modules and param_name.endswith(".weight")

    def get_quantize_ops(self):
        return LlmqQuantize(self)

    # ---- both ---------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        spec = arch_for(model.config)
        if self.pre_quantized:  # a mixture of experts' experts as linears (moe.py), each a QuantLinear to load into
            moe.unfuse(model)
        self.transposed = spec.transposed
        rec = self.quantization_config.record
        if self.pre_quantized:
            self.modules = dict(rec.modules)
            if rec.sentinel:
                model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                    "^" + rec.sentinel.replace(".", r"\.") + "$"}  # fmt: skip
        else:
            skip = set(self.quantization_config.modules_to_not_convert or [])
            shapes = {n: s for n, s in linear_shapes_of(model.config, spec)[0].items() if n not in skip}
            self.plan = resolve_shapes(self.plan, shapes)[0]  # llama.cpp's fallback where a block format does not fit
            # experts load fused (in whatever layout the checkpoint has them); they are split into linears and
            # quantized once loaded (_quantize_experts)
            self.experts = {n: s for n, s in shapes.items() if _expert(spec, n)}
            self.modules = {n: self._on_the_fly_record(n, s) for n, s in shapes.items() if n not in self.experts}
        for name, mrec in self.modules.items():
            old = _module(model, name)
            shape = tuple(weight_of(old, spec).shape)  # [out, in]
            if shape != tuple(mrec.shape):
                raise LlmqError(f"{name}: checkpoint shape {list(mrec.shape)} does not match the model's {list(shape)}")
            q = nn.skeleton(mrec, old.bias is not None, self.quantization_config.backend)
            if not self.pre_quantized:
                q.register_parameter("weight", torch.nn.Parameter(torch.empty(old.weight.shape, device="meta"),
                                                                  requires_grad=False))  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
            p = model.get_submodule(parent)
            if not any(True for _ in p.parameters(recurse=False)):
                # its own _init_weights (e.g. GPT-2's scaled c_proj init) would reach for child.weight; the
                # children's tensors come from the checkpoint, so there is nothing of its own to initialise
                p._is_hf_initialized = True
        if self.pre_quantized and checkpoint_files:
            files = [Path(f) for f in checkpoint_files]
            # every shard readable, its format version, and its sha256 against the index (LLMQ_VERIFY=0 skips the
            # hashing: ~1 s per GB)
            self.verify_values = VERIFY.get() and verify.enabled()
            self.shards = CheckpointReader(files[0].parent, verify=self.verify_values)
            check_checkpoint(model, rec, files)
        return model

    def _on_the_fly_record(self, name: str, shape: tuple[int, int]) -> ModuleRecord:
        scheme = self.plan.scheme_for(name)
        nnz = round(shape[0] * shape[1] * scheme.outliers)
        return ModuleRecord(name, shape, (WeightRecord(scheme, shape, nnz),))

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.errors:
            raise self.errors[0]
        for name in self.modules:
            mod = model.get_submodule(name)
            if "weight" in mod._parameters:
                del mod._parameters["weight"]
            # what the loader filled carries _is_hf_initialized; a part it did not find is left uninitialised
            missing = [k for k in mod.part_names if not getattr(mod.get_buffer(k), "_is_hf_initialized", False)
                       and not mod.get_buffer(k).is_meta]  # fmt: skip (meta = offloaded by accelerate: loaded later)
            if missing:
                raise LlmqError(f"{name}: missing tensor(s) {', '.join(name + '.' + k for k in missing)}; re-copy or "
                                "re-quantize the model")  # fmt: skip
            try:
                if self.modules[name].split:  # every row in one of the pieces, as many as config.json says
                    codec.check_row_part(self.modules[name], mod.row_part)
                qw = mod.quantized_weight()
                qw.validate(name)
                qw.check_values(name, values=self.pre_quantized and self.verify_values)
            except verify.DamagedValue as e:
                raise self._located(e) from None
            mod.prepare(name)
        if self.experts:
            self._quantize_experts(model)
        # save_pretrained writes the module names llmq's checkpoints use (a loaded Mixtral would otherwise be saved
        # under its original block_sparse_moe names, which llmq's own header checks do not look for)
        model._weight_conversions = []
        if self.pre_quantized and self.verify_values:
            self._check_full_precision(model)
        if not self.pre_quantized:
            self.quantization_config.record = self._record(model)
            self.quantization_config.pre = True
        return model

    def _quantize_experts(self, model) -> None:
        """On the fly, after loading: the fused experts become linears (moe.py), each RTN-quantized into a QuantLinear
        (one expert's fp weights at a time beside the packed ones)."""
        moe.unfuse(model)
        for name in self.experts:
            old = model.get_submodule(name)
            check_finite(old.weight, name)
            qw = rtn(old.weight.detach().to(torch.float32), self.plan.scheme_for(name))
            q = nn.QuantLinear(qw, old.bias.detach() if old.bias is not None else None, self.quantization_config.backend)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to(old.weight.device))
            del old
            q.prepare(name)
            self.modules[name] = ModuleRecord.of(name, qw)
        self.experts = {}

    def _located(self, e: "verify.DamagedValue") -> LlmqError:
        shard = self.shards.weight_map.get(e.tensor)
        return e.located(self.shards.dir / shard if shard else self.shards.dir)

    def _check_full_precision(self, model) -> None:
        """Every float tensor the checkpoint gave the model is finite (norms, embeddings, biases, head; the quantized
        modules' scales were checked with their module)."""
        try:
            verify.model_tensors(model.state_dict())
        except verify.DamagedValue as e:
            raise self._located(e) from None

    def _record(self, model) -> CheckpointRecord:
        modules = {n: ModuleRecord.of(n, model.get_submodule(n).quantized_weight()) for n in self.modules}
        not_conv = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return CheckpointRecord.build(self.plan, modules, not_conv, {"name": "rtn", "on_the_fly": True})

    def get_state_dict_and_metadata(self, model):
        """save_pretrained: the model's state plus the sentinel, and llmq's shard metadata."""
        rec = self.quantization_config.record
        state = model.state_dict()
        if rec is not None and rec.sentinel:
            state[rec.sentinel] = torch.zeros(0, dtype=torch.uint8)
        return state, dict(SHARD_METADATA)


def _expert(spec, name: str) -> bool:
    """A linear inside one of a layer's expert sets (name: model.layers.N.rel)."""
    rest = name.removeprefix(spec.layers + ".")
    i, _, rel = rest.partition(".")
    return i.isdigit() and spec.at(int(i)).expert(rel) is not None


def _module(model, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LlmqError(f"quantized module {name!r} does not exist in the model built from config.json") from None


def check_checkpoint(model, record: CheckpointRecord, files: list[Path]) -> None:
    """Before any data is read: every quantized module's tensors are in the shards with the dtypes and shapes the
    record implies (codec.check_headers), every other tensor the model needs is there (a tied one may be left out),
    and nothing else is. Errors name the tensor and the directory."""
    where = files[0].parent
    headers = {}
    for f in files:
        headers |= tensor_headers(f)
    owned = codec.check_headers(record, headers, str(where))  # exactly each module's codec.layout
    needed = set(model.state_dict()) - {k for m in record.modules.values() for k in codec.layout(m)}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(needed - set(headers) - tied)
    if missing:
        raise LlmqError(f"{where}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")
    unexpected = sorted(set(headers) - owned - needed - {record.sentinel})
    if unexpected:
        raise LlmqError(f"{where}: unexpected tensor(s) {unexpected[:5]}; the checkpoint does not match config.json")
    state = model.state_dict()
    stored = _stored_dtype(where)
    for k in sorted(needed & set(headers)):  # the full-precision tensors: the model's shape, config.json's dtype
        dtype, shape = headers[k][0], headers[k][1]
        ok = dtype is not None and dtype.is_floating_point and (stored is None or dtype == stored)
        if not ok or tuple(shape) != tuple(state[k].shape):
            want = str(stored or "a float dtype").removeprefix("torch.")
            raise LlmqError(f"{where}: tensor {k} is {str(dtype).removeprefix('torch.')} {list(shape)}; config.json "
                            f"says {want} {list(state[k].shape)}")  # fmt: skip


def _stored_dtype(d: Path) -> torch.dtype | None:
    """The storage dtype of the full-precision tensors, as config.json records it (llmq writes `dtype`)."""
    try:
        name = json.loads((d / "config.json").read_text()).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return DTYPES.get(name) if isinstance(name, str) else None


def compile_decoding(model, max_cache_len: int = 2048, mode: str | None = None):
    """Make `model.generate()` decode with a static KV cache and a torch.compile'd forward, on any device.

    transformers compiles the decoding step only on GPUs and only with a static cache; this sets both for
    the CPU too. The cache is sized once for `max_cache_len` tokens (prompt + new tokens) so that later
    calls reuse the compiled graph instead of recompiling (the first call compiles: tens of seconds on a
    CPU). `mode`: torch.compile mode (default "default" on CPU, "reduce-overhead" = CUDA graphs on GPU).
    Works for llmq models (QuantLinear traces without graph breaks) and plain ones. Returns the model."""
    from transformers.generation import CompileConfig

    gc = model.generation_config
    gc.cache_implementation = "static"
    gc.max_cache_len = max_cache_len
    cc = CompileConfig(mode=mode or ("default" if model.device.type == "cpu" else "reduce-overhead"))
    cc._compile_all_devices = True  # transformers' switch for compiling on devices other than GPUs/TPUs
    gc.compile_config = cc
    return model
