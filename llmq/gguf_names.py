"""Hugging Face model -> llama.cpp's GGUF naming: the architecture, the family's own metadata, the tensor names
(gguf-py's own map), and what llama.cpp's converter (convert_hf_to_gguf.py) does to a family's tensors: the row
permutation of Llama's q/k projections, Gemma's norms stored as 1 + w.

What cannot be seen by running a layer lives here, as data: one `Family` per Hugging Face model type the exporter
writes. Every family in FAMILIES is run by llama.cpp in benchmarks/families.py (results/families.md); a model type
absent from it is refused with the reason (REFUSED), or with the list of what is written.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from .errors import LlmqError


def _none(c: dict) -> dict:
    return {}


def _sliding(c: dict) -> dict:
    """sliding_window and the per-layer pattern (llama.cpp reads the array before its built-in pattern)."""
    if not c.get("sliding_window"):
        return {}
    out = {"add_sliding_window": int(c["sliding_window"])}
    if c.get("layer_types"):
        out["add_sliding_window_pattern"] = [t == "sliding_attention" for t in c["layer_types"]]
    return out


def _query_scale(c: dict) -> None:
    """Gemma scales queries by query_pre_attn_scalar^-1/2; llama.cpp by head_dim^-1/2 (hidden/heads for 27B sizes)."""
    q, hd = c.get("query_pre_attn_scalar"), c.get("head_dim")
    big = c["hidden_size"] // c["num_attention_heads"]
    if q is not None and q != hd and not (c["num_hidden_layers"] in (46, 62) and q == big):
        raise LlmqError(f"query_pre_attn_scalar {q} differs from head_dim {hd}: llama.cpp scales queries by "
                        "head_dim^-1/2 for this family, so the GGUF would compute another model")  # fmt: skip


def _gemma2(c: dict) -> dict:
    _query_scale(c)
    return {"add_attn_logit_softcapping": float(c["attn_logit_softcapping"] or 0.0),
            "add_final_logit_softcapping": float(c["final_logit_softcapping"] or 0.0), **_sliding(c)}  # fmt: skip


def _gemma3(c: dict) -> dict:
    _query_scale(c)
    if c.get("attn_logit_softcapping"):
        raise LlmqError("attn_logit_softcapping is set: llama.cpp's gemma3 has no attention soft-capping")
    out = _sliding(c)
    swa = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
    if out and (swa.get("rope_theta") or c.get("rope_local_base_freq")):
        out["add_rope_freq_base_swa"] = float(swa.get("rope_theta") or c["rope_local_base_freq"])
    if c.get("final_logit_softcapping"):
        out["add_final_logit_softcapping"] = float(c["final_logit_softcapping"])
    return out


def _phi3(c: dict) -> dict:
    p = rope_parameters(c)
    if p.get("long_factor") or p.get("short_factor"):
        raise LlmqError("long-context rope factors (longrope) are not written by this exporter; pass --gguf-metadata "
                        "with a GGUF of the same model")  # fmt: skip
    out = {"add_sliding_window": int(c.get("sliding_window") or 0)}  # 0: what convert_hf_to_gguf.py writes for none
    if p.get("original_max_position_embeddings"):
        out["add_rope_scaling_orig_ctx_len"] = int(p["original_max_position_embeddings"])
    return out


def _granite(c: dict) -> dict:
    keys = {"attention_multiplier": "add_attention_scale", "embedding_multiplier": "add_embedding_scale",
            "residual_multiplier": "add_residual_scale", "logits_scaling": "add_logit_scale"}  # fmt: skip
    return {m: float(c[k]) for k, m in keys.items() if c.get(k)}


def _smollm3(c: dict) -> dict:
    want = [int((i + 1) % 4 != 0) for i in range(c["num_hidden_layers"])]
    if c.get("no_rope_layers") is not None and list(c["no_rope_layers"]) != want:
        raise LlmqError(f"no_rope_layers {c['no_rope_layers']}: llama.cpp's smollm3 drops rotary on every 4th layer "
                        "only")  # fmt: skip
    return {}


def _experts(c: dict, norm: bool) -> dict:
    """A mixture of experts' counts; `norm`: whether llama.cpp's graph for the architecture renormalises the top-k
    routing weights (qwen3moe and llama: yes; olmoe: no), which must be what the model does."""
    n = c.get("num_local_experts") or c.get("num_experts")
    if c.get("norm_topk_prob", norm) != norm:
        raise LlmqError(f"norm_topk_prob = {c.get('norm_topk_prob')}: llama.cpp's graph for this architecture "
                        f"{'renormalises' if norm else 'does not renormalise'} the top-k routing weights")  # fmt: skip
    return {"add_expert_count": int(n), "add_expert_used_count": int(c["num_experts_per_tok"])}


def _mixtral(c: dict) -> dict:
    return _experts(c, True) | _sliding(c)


def _qwen3_moe(c: dict) -> dict:
    if c.get("mlp_only_layers"):
        raise LlmqError("mlp_only_layers (dense layers among the MoE ones) are not written by this exporter")
    return _experts(c, True) | {"add_expert_feed_forward_length": int(c["moe_intermediate_size"])}


def _olmoe(c: dict) -> dict:
    heads = c["num_attention_heads"]
    if (c.get("num_key_value_heads") or heads) != heads:
        raise LlmqError("llama.cpp's olmoe normalises k over all heads (as OLMoE-1B-7B, which has no grouped-query "
                        f"attention): num_key_value_heads {c.get('num_key_value_heads')} != {heads} is not written")  # fmt: skip
    return _experts(c, False)


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture (gguf.MODEL_ARCH, lower case)
    permute: bool = False  # q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm computes x * (1 + w))
    metadata: Callable[[dict], dict] = _none  # the family's own keys: GGUFWriter method -> value; raises if unfit


FAMILIES = {
    "llama": Family("llama", permute=True), "mistral": Family("llama", permute=True), "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"), "olmo2": Family("olmo2", metadata=_sliding), "phi3": Family("phi3", metadata=_phi3),
    "gemma2": Family("gemma2", norm_shift=1.0, metadata=_gemma2),
    "gemma3_text": Family("gemma3", norm_shift=1.0, metadata=_gemma3),
    "granite": Family("granite", permute=True, metadata=_granite),
    "smollm3": Family("smollm3", permute=True, metadata=_smollm3),
    # mixtures of experts: the experts' linears stacked into ffn_{gate,up,down}_exps [E, rows, cols], the router as
    # ffn_gate_inp in F32 (gguf_name, exporters/gguf.py)
    "mixtral": Family("llama", permute=True, metadata=_mixtral), "qwen3_moe": Family("qwen3moe", metadata=_qwen3_moe),
    "olmoe": Family("olmoe", metadata=_olmoe),
}  # fmt: skip
REFUSED = {
    "deepseek_v3": "llama.cpp stores MLA's kv_b_proj split into attn_k_b (transposed) and attn_v_b: a transposed "
                   "block-quantized matrix would have to be re-rounded",
    "glm4": "llama.cpp's glm4 reads partial interleaved rotary sections this exporter does not write yet",
    "gpt2": "the GGUF export writes rotary-attention decoders; GPT-2's Conv1D layers are not converted",
    "opt": "llama.cpp has no OPT architecture",
    "gpt_oss": "llama.cpp's gpt-oss reads its experts as MXFP4 with attention sinks, which this exporter does not write",
}  # fmt: skip


def family_of(model_type: str | None) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = REFUSED.get(model_type or "", "not supported yet")
    raise LlmqError(f"model_type {model_type!r}: {why}; the GGUF export writes {', '.join(FAMILIES)}")


def rope_parameters(c: dict) -> dict:
    """The rotary parameters of the full-attention layers, transformers 5 (`rope_parameters`, per layer type for
    Gemma 3) or 4 (`rope_theta` + `rope_scaling`) style."""
    p = dict(c.get("rope_parameters") or {})
    p = dict(p.get("full_attention", p))
    p.update({k: v for k, v in (c.get("rope_scaling") or {}).items() if k not in p})
    if "rope_theta" not in p and c.get("rope_theta") is not None:
        p["rope_theta"] = c["rope_theta"]
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


def head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def rope_metadata(c: dict) -> dict:
    p = rope_parameters(c)
    out = {"add_rope_freq_base": float(p.get("rope_theta", 10000.0)),
           "add_rope_dimension_count": int(head_dim(c) * p.get("partial_rotary_factor", 1.0))}  # fmt: skip
    if p["rope_type"] == "linear":
        out |= {"add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": float(p["factor"])}
    elif p["rope_type"] != "default":
        raise LlmqError(f"rope type {p['rope_type']!r} is not written by this exporter; pass --gguf-metadata with a "
                        "GGUF of the same model")  # fmt: skip
    if math.isnan(out["add_rope_freq_base"]):
        raise LlmqError("rope_theta is NaN")
    return out


def name_map(model_type: str | None, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's map of HF tensor names to GGUF ones for this model's architecture (any architecture gguf knows)."""
    mt = model_type or ""
    arch = FAMILIES[mt].arch if mt in FAMILIES else mt
    try:
        return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    except KeyError:
        raise LlmqError(f"model_type {mt!r} has no llama.cpp architecture in gguf-py") from None


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight'; an expert's linear
    'model.layers.0.mlp.experts.5.up_proj.weight' -> the stacked 'blk.0.ffn_up_exps.weight' it is one slice of."""
    g = names.get_name(stacked(hf_name), try_suffixes=(".weight", ".bias"))
    if g is None:
        raise LlmqError(f"{hf_name}: llama.cpp has no tensor of this name (gguf-py's tensor map)")
    return g


def stacked(hf_name: str) -> str:
    """An expert's tensor name without its expert index (llama.cpp stores the experts of a layer as one tensor)."""
    return _EXPERT.sub(r"\1.\3", hf_name)


def expert_index(hf_name: str) -> int | None:
    m = _EXPERT.search(hf_name)
    return int(m[2]) if m else None


_EXPERT = re.compile(r"(\.experts)\.(\d+)\.((?:gate|up|down)_proj)")


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the output rows of q_proj (n_head heads) or k_proj (n_kv_head):
    any per-row data (weights, block bytes, biases) moves with its row."""
    R = rows.shape[0]
    return rows.reshape(n_head, 2, R // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
