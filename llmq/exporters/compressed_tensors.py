"""compressed-tensors "pack-quantized": the checkpoint format vLLM and SGLang read natively (written by
llm-compressor, read by transformers with the `compressed-tensors` package).

Per quantized Linear NAME (R = out_features, C = in_features, G = C / group_size, b = num_bits):

    NAME.weight_packed      int32 [R, ceil(C·b/32)]  codes along in_features, a dense LSB-first bitstream (common.py);
                                                     stored value = signed code + 2**(b-1) = llmq's unsigned code
    NAME.weight_scale       export dtype [R, G]      (per output channel: [R, 1])
    NAME.weight_zero_point  int32 [ceil(R·b/32), G]  asymmetric only: zero points packed along dim 0 (out),
                                                     stored as signed zero + 2**(b-1) = llmq's unsigned zero
    NAME.weight_shape       int64 [2]                [R, C]

Weight = (q − zp)·s, computed by compressed-tensors in the scale's dtype. llmq's codes and zero points are written
as they are; llmq's scales are written in the export dtype, exact when they are representable there (plain fp16
scales into an fp16 export, any scales into float32), so the dequantized weights are llmq's bit for bit. Double-
quantized (or bf16/fp32) scales written into an fp16 export are rounded to the nearest fp16: the export summary
gives each module's largest weight difference. Strategies: "group" (the group must divide in_features: compressed-
tensors has no short last group) and "channel" (llmq's group_size -1). act-order is carried by static groups
(actorder "weight": no g_idx); a stored permutation cannot be written.
"""
from __future__ import annotations

import torch

from .. import moe
from ..formats.grouping import PER_CHANNEL
from ..qtensor import QuantizedWeight
from ..record import CheckpointRecord, ModuleRecord
from .common import pack_words, why_not_integer

NAME = "compressed-tensors"
SHARD_METADATA = {"format": "pt"}


def why_not(m: ModuleRecord, opts: dict) -> str | None:
    """None when compressed-tensors pack-quantized holds module `m` exactly as llmq stored it, else why not and the
    `llmq quantize` flags that avoid it."""
    return why_not_integer(m, "compressed-tensors")


def encode(name: str, qw: QuantizedWeight, dtype: torch.dtype, opts: dict) -> dict[str, torch.Tensor]:
    R, C = qw.shape
    b = qw.scheme.bits
    out = {f"{name}.weight_packed": pack_words(qw.codes(), b),
           f"{name}.weight_scale": qw.scales().to(dtype).contiguous(),
           f"{name}.weight_shape": torch.tensor([R, C], dtype=torch.int64)}  # fmt: skip
    z = qw.zeros()
    if z is not None:
        out[f"{name}.weight_zero_point"] = pack_words(z.to(torch.uint8).t().contiguous(), b).t().contiguous()
    return out


def dequantize(name: str, tensors: dict[str, torch.Tensor], qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight `encode` wrote as compressed-tensors computes it, in the scale's dtype (= `dtype`), [R, C]."""
    s = tensors[f"{name}.weight_scale"]  # [R, G]
    q = qw.codes().to(s.dtype).reshape(qw.shape[0], s.shape[1], -1)  # [R, G, L]
    z = qw.zeros()
    z = z.to(s.dtype).unsqueeze(-1) if z is not None else 1 << (qw.scheme.bits - 1)
    return ((q - z) * s.unsqueeze(-1)).reshape(qw.shape)


def weights_args(scheme, actorder: str | None) -> dict:
    channel = scheme.group_size == PER_CHANNEL
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.sym, "strategy": "channel" if channel else "group",
            "group_size": None if channel else scheme.group_size, "actorder": actorder, "dynamic": False,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}  # fmt: skip


def config(record: CheckpointRecord, opts: dict) -> dict:
    """The `quantization_config` of the export: one config group per distinct scheme (mixed precision: several groups,
    each targeting its modules by exact name), every other Linear ignored."""
    gptq = record.method.get("gptq") or {}
    actorder = "weight" if gptq.get("act_order") and gptq.get("static_groups") else None
    groups: dict[str, list[str]] = {}
    args: dict[str, dict] = {}
    for name, m in record.modules.items():
        a = weights_args(m.scheme, actorder)
        key = repr(sorted(a.items()))
        groups.setdefault(key, []).append(name)
        args[key] = a
    whole = len(groups) == 1
    mt = opts.get("model_type")

    def name(n: str) -> str:  # the family's released checkpoint names (moe.checkpoint_name: Mixtral's experts)
        return moe.checkpoint_name(mt, n + ".weight").removesuffix(".weight") if mt else n

    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if whole else [f"re:^{name(n).replace('.', '[.]')}$" for n in names],
                       "weights": args[key], "input_activations": None, "output_activations": None, "format": None}
        for i, (key, names) in enumerate(groups.items())
    }  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(name(n) for n in record.not_converted), "kv_cache_scheme": None,
            "global_compression_ratio": None}  # fmt: skip


def serving(dest: str) -> str:
    return (f"vLLM / SGLang: `vllm serve {dest}`, or `vllm.LLM('{dest}')`; transformers: `pip install "
            f"compressed-tensors`, then `AutoModelForCausalLM.from_pretrained('{dest}')`")
