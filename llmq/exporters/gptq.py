"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout; vLLM and transformers read them).

Per quantized Linear NAME (R = out_features, C = in_features, G groups of L columns, b = bits, P = 32 / b):

    NAME.qweight  int32 [C / P, R]      code k of output n in bits [(k % P)·b, +b) of word (k // P, n)
    NAME.qzeros   int32 [G, R / P]      zero of group g, output n in bits [(n % P)·b, +b) of word (g, n // P);
                                        checkpoint_format "gptq" (v1) stores zero − 1, "gptq_v2" the zero itself
    NAME.scales   float16 [G, R]
    NAME.g_idx    int32 [C]             group of each input column (k // L: static groups, no reordering)

Weight = scales[g]·(q − zero[g]). llmq's codes and zeros are written as they are (the int32 words are llmq's
packed bitstream, common.py), its scales in fp16 (exact for llmq's fp16 scales; double-quantized or bf16/fp32 scales
are rounded, and the export summary says by how much). A symmetric grid's zero is 2**(b-1). v1's zero − 1 cannot
hold an asymmetric group whose zero is 0 (it would wrap to 2**b − 1): such a module is refused for v1 (write v2,
which GPTQModel reads, or quantize with --sym). vLLM serves GPTQ symmetric at 4 or 8 bits only (desc_act false);
2- and 3-bit codes are refused here, as is a stored act-order permutation (desc_act) and mixed precision.
"""
from __future__ import annotations

import torch

from ..formats.grouping import group_len
from ..qtensor import QuantizedWeight
from ..record import CheckpointRecord, ModuleRecord
from .common import pack_words, why_not_integer

NAME = "gptq"
SHARD_METADATA = {"format": "pt"}
FORMATS = {"v1": "gptq", "v2": "gptq_v2"}


def why_not(m: ModuleRecord, opts: dict) -> str | None:
    why = why_not_integer(m, "GPTQ")
    if why:
        return why
    w = m.pieces[0]
    R, C = w.shape
    if w.scheme.bits not in (4, 8):
        return f"has {w.scheme.bits}-bit codes; vLLM's GPTQ serves 4 and 8 bits: quantize with --bits 4 or 8"
    per = 32 // w.scheme.bits
    if C % per or R % per:
        return f"has shape [{R}, {C}]; GPTQ packs {per} codes per int32 and needs both dimensions divisible by {per}"
    return None


def why_not_data(qw: QuantizedWeight, opts: dict) -> str | None:
    """v1 stores zero − 1: a zero of 0 cannot be written (a property of the data, checked before writing)."""
    z = qw.zeros()
    if opts.get("gptq_format", "v1") == "v1" and z is not None and bool((z == 0).any()):
        g = int((z == 0).nonzero()[0, 1])
        return (f"is asymmetric with a zero point of 0 (group {g}), which GPTQ v1 (zero − 1) cannot store; export "
                "with --gptq-format v2 (GPTQModel), or quantize with --sym")  # fmt: skip
    return None


def zeros_of(qw: QuantizedWeight) -> torch.Tensor:
    """Zero points [R, G] as integers: the stored ones, or 2**(b-1) for a symmetric grid."""
    z = qw.zeros()
    G = qw.scales().shape[1]
    return torch.full((qw.shape[0], G), 1 << (qw.scheme.bits - 1), dtype=torch.uint8) if z is None else z.to(torch.uint8)


def encode(name: str, qw: QuantizedWeight, dtype: torch.dtype, opts: dict) -> dict[str, torch.Tensor]:
    R, C = qw.shape
    b = qw.scheme.bits
    z = zeros_of(qw)  # [R, G]
    if opts.get("gptq_format", "v1") == "v1":
        z = z - 1  # checked by check_zeros: no zero is 0
    L = group_len(C, qw.scheme.group_size)
    return {f"{name}.qweight": pack_words(qw.codes(), b).t().contiguous(),  # [C/P, R]
            f"{name}.qzeros": pack_words(z.t().contiguous(), b),  # [G, R/P]
            f"{name}.scales": qw.scales().t().to(torch.float16).contiguous(),  # [G, R]
            f"{name}.g_idx": (torch.arange(C) // L).to(torch.int32)}  # fmt: skip


def dequantize(name: str, tensors: dict[str, torch.Tensor], qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight `encode` wrote, fp16 scales times integer codes computed in `dtype` (the model's), [R, C]."""
    s = tensors[f"{name}.scales"].to(dtype).t()  # [R, G]
    L = group_len(qw.shape[1], qw.scheme.group_size)
    g = torch.arange(qw.shape[1]) // L
    return s[:, g] * (qw.codes().to(dtype) - zeros_of(qw).to(dtype)[:, g])


def config(record: CheckpointRecord, opts: dict) -> dict:
    schemes = {m.scheme for m in record.modules.values()}
    s = next(iter(schemes))
    gptq = record.method.get("gptq") or {}
    return {"quant_method": "gptq", "bits": s.bits, "group_size": s.group_size, "desc_act": False, "sym": s.sym,
            "checkpoint_format": FORMATS[opts.get("gptq_format", "v1")], "static_groups": bool(gptq.get("static_groups")),
            "true_sequential": True, "damp_percent": gptq.get("damp", 0.01), "modules_in_block_to_quantize": None}  # fmt: skip


def why_not_model(record: CheckpointRecord, opts: dict) -> str | None:
    """What keeps the whole model out of one GPTQ checkpoint (a single scheme for every module)."""
    schemes = {m.scheme for m in record.modules.values() if not m.split}
    if len({(s.bits, s.group_size, s.sym) for s in schemes}) > 1:
        return ("uses several schemes (mixed precision); a GPTQ checkpoint holds one: export --to compressed-tensors, "
                "which holds one config group per scheme")  # fmt: skip
    return None


def serving(dest: str) -> str:
    return f"vLLM: `vllm serve {dest}` (GPTQ, symmetric 4/8-bit); transformers with `gptqmodel` installed"
