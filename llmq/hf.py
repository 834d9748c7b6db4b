"""transformers integration: `quant_method: "llmq"` registered with transformers' own registries.

`import llmq` registers `LlmqConfig` and `LlmqHfQuantizer` (transformers.quantizers.register_*), so that
  - `AutoModelForCausalLM.from_pretrained(llmq_dir)` builds QuantLinear skeletons (packed buffers of the
    stored dtypes and shapes, on the meta device) before the weights load, and the loader fills them from
    the shards: full-precision weights of quantized layers are never materialised;
  - `from_pretrained(fp_model, quantization_config=LlmqConfig(method="rtn"|"nf4"|"nf3"|"nf2", ...))` quantizes each
    linear's weight as it arrives (a ConversionOps), so peak memory stays near the quantized size.

Safety: every llmq checkpoint carries a sentinel tensor under the real name of its first quantized
module's `.weight`, with shape [0]. Without llmq imported, transformers only warns about the unknown
quant_method; the sentinel then makes it raise (size mismatch) instead of building a model with random
weights. With llmq imported that module is a QuantLinear, and the key is ignored.
"""
from __future__ import annotations

import copy
import logging

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .archs import arch_for
from .checkpoint import FORMAT_VERSION, QUANT_METHOD, SHARD_METADATA
from .config import NF_BITS, QuantPlan, QuantScheme
from .errors import LlmqError
from .nn import QuantLinear, RowSplitLinear

log = logging.getLogger("llmq")
SCHEME_KEYS = ("bits", "format", "group_size", "sym", "double_quant", "scale_dtype", "clip_search", "outliers")


@register_quantization_config(QUANT_METHOD)
class LlmqConfig(QuantizationConfigMixin):
    """Either the `quantization_config` of an llmq checkpoint (pre-quantized), or a request to quantize at
    load time: LlmqConfig(method="rtn" | "nf4" | "nf3" | "nf2", bits=4, group_size=128, sym=False, double_quant=False,
    ...); "nf4" / "nf3" / "nf2" default to group_size=64.

    backend: "auto" | "reference" | "cpu" | "triton" for the QuantLinear layers quantized on the fly. For a
    pre-quantized checkpoint transformers ignores a passed config (it keeps the checkpoint's); set
    LLMQ_BACKEND before loading, or call llmq.set_backend(model, name) after."""

    def __init__(self, method: str | dict = "rtn", backend: str = "auto", modules_to_not_convert=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.backend = backend
        self.modules_to_not_convert = modules_to_not_convert
        self.pre = "quantized_modules" in kwargs  # the dict read from a checkpoint's config.json
        if self.pre:
            self.record = {"method": method, **kwargs}
            return
        name = method if isinstance(method, str) else method.get("name")
        if name == "gptq":
            raise LlmqError("GPTQ needs calibration data and cannot run inside from_pretrained; quantize offline "
                            "with `llmq quantize MODEL OUT --method gptq --calib ...`, then load OUT")  # fmt: skip
        if name not in ("rtn", *NF_BITS):
            raise LlmqError(f"LlmqConfig(method={name!r}): on-the-fly quantization supports 'rtn', 'nf4', "
                            "'nf3' and 'nf2'")
        scheme = {k: v for k, v in kwargs.items() if k in SCHEME_KEYS}
        unknown = set(kwargs) - set(SCHEME_KEYS) - {"quant_method", "format_version"}
        if unknown:
            raise LlmqError(f"LlmqConfig: unknown options {sorted(unknown)}; scheme options are {SCHEME_KEYS}")
        if name in NF_BITS:  # round-to-nearest onto that codebook
            scheme.setdefault("format", name)
            scheme.setdefault("group_size", 64)
        self.scheme = QuantScheme(**scheme)
        self.record = None

    def get_loading_attributes(self) -> dict:
        return {"backend": self.backend}

    def to_dict(self) -> dict:
        if self.record is not None:
            return copy.deepcopy(self.record) | {"quant_method": QUANT_METHOD}
        return {"quant_method": QUANT_METHOD, "method": {"name": "rtn"}, "scheme": self.scheme.to_dict()}


class LlmqQuantize(ConversionOps):
    """On-the-fly RTN: one full-precision weight in, the QuantLinear's packed parts out."""

    def __init__(self, hf_quantizer: "LlmqHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        from .algorithms.rtn import rtn

        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            name = key.rpartition(".")[0]
            W = value.t() if self.hf_quantizer.transposed else value
            qw = rtn(W.to(torch.float32), self.hf_quantizer.plan.scheme_for(name))
            self.hf_quantizer.done[name] = qw.shape
            out |= {k: v.to(value.device) for k, v in qw.tensors(name).items()}
            if missing_keys is not None:
                missing_keys.discard(key)  # consumed: it became the packed parts
        return out


@register_quantizer(QUANT_METHOD)
class LlmqHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: LlmqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.done: dict[str, tuple[int, int]] = {}
        self.transposed = False
        qc = quantization_config
        if self.pre_quantized and not qc.pre:
            raise LlmqError("this checkpoint's quantization_config is not a complete llmq config; re-save it with llmq")
        if self.pre_quantized:
            from .modeling import plan_from_config

            v = qc.record.get("format_version")
            if v != FORMAT_VERSION:
                raise LlmqError(f"llmq checkpoint format_version {v!r}; this llmq reads version {FORMAT_VERSION}: "
                                "upgrade llmq or re-quantize")  # fmt: skip
            self.plan = plan_from_config(qc.record)
        else:
            self.plan = QuantPlan(qc.scheme)

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
        return not self.pre_quantized and param_name.rpartition(".")[0] in self.targets and param_name.endswith(".weight")

    def get_quantize_ops(self):
        return LlmqQuantize(self)

    # ---- both ---------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs):
        spec = arch_for(model.config)
        self.transposed = spec.transposed
        rec = self.quantization_config.record
        if self.pre_quantized:
            self.targets = list(rec["quantized_modules"])
            shapes = {n: tuple(s) for n, s in rec["shapes"].items()}
            nnz, permuted = rec.get("outlier_nnz", {}), set(rec.get("permuted_modules", []))
            if rec.get("sentinel"):
                model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                    "^" + rec["sentinel"].replace(".", r"\.") + "$"}  # fmt: skip
        else:
            from .archs import quantizable_names

            skip = set(self.quantization_config.modules_to_not_convert or [])
            self.targets = [n for n in quantizable_names(model, spec) if n not in skip]
            shapes = {}
            for n in self.targets:
                w = model.get_submodule(n).weight
                shapes[n] = (w.shape[1], w.shape[0]) if spec.transposed else tuple(w.shape)
            nnz = {n: round(s[0] * s[1] * self.plan.scheme_for(n).outliers) for n, s in shapes.items()}
            permuted = set()
        self.shapes = shapes
        splits = rec.get("row_splits", {}) if self.pre_quantized else {}
        for name in self.targets:
            old = model.get_submodule(name)
            if name in splits:
                from .modeling import split_schemes

                sp = splits[name]
                q = RowSplitLinear.skeleton(shapes[name], split_schemes(name, sp, shapes[name]), sp["rows"],
                                            old.bias is not None, sp["outlier_nnz"], sp["permuted"],
                                            self.quantization_config.backend)  # fmt: skip
            else:
                q = QuantLinear.skeleton(shapes[name], self.plan.scheme_for(name), old.bias is not None,
                                         nnz.get(name, 0), name in permuted, self.quantization_config.backend)  # fmt: skip
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
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self.targets:
            mod = model.get_submodule(name)
            if "weight" in mod._parameters:
                del mod._parameters["weight"]
            # what the loader filled carries _is_hf_initialized; a part it did not find is left uninitialised
            missing = [k for k in mod.part_names if not getattr(mod.get_buffer(k), "_is_hf_initialized", False)
                       and not mod.get_buffer(k).is_meta]  # fmt: skip (meta = offloaded by accelerate: loaded later)
            if missing:
                raise LlmqError(f"{name}: tensor(s) {', '.join(name + '.' + k for k in missing)} missing from the "
                                "checkpoint; re-copy or re-quantize the model")  # fmt: skip
            mod.quantized_weight().validate(name)
            mod.prepare(name)
        if not self.pre_quantized:
            self.quantization_config.record = self._record(model)
            self.quantization_config.pre = True
        return model

    def _record(self, model) -> dict:
        from .modeling import module_facts, quantization_config

        facts = {n: module_facts(model.get_submodule(n).quantized_weight()) for n in self.targets}
        not_conv = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return quantization_config(self.plan, facts, not_conv, {"name": "rtn", "on_the_fly": True})

    def get_state_dict_and_metadata(self, model):
        """save_pretrained: the model's state plus the sentinel, and llmq's shard metadata."""
        rec = self.quantization_config.record
        state = model.state_dict()
        if rec and rec.get("sentinel"):
            state[rec["sentinel"]] = torch.zeros(0, dtype=torch.uint8)
        return state, dict(SHARD_METADATA)


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
