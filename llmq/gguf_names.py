"""Hugging Face model -> llama.cpp's GGUF naming: the architecture, the tensor names (gguf-py's own map), and the
row permutation llama.cpp's converter applies to Llama's q/k projections.

Architectures llama.cpp runs from this exporter (the rest are refused with the reason): Llama and Mistral (GGUF
"llama": q_proj/k_proj rows permuted from Hugging Face's half-split rotary layout to llama.cpp's interleaved one, as
convert_hf_to_gguf.py does) and Qwen2 ("qwen2": no permutation, biases kept).
"""
from __future__ import annotations

import gguf
import torch

from .errors import LlmqError

# HF model_type -> (GGUF architecture, q/k rows permuted for rotary)
EXPORTABLE = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def arch_of(model_type: str | None) -> tuple[str, bool]:
    mt = model_type
    if mt not in EXPORTABLE:
        raise LlmqError(f"model_type {mt!r}: the GGUF export writes {', '.join(EXPORTABLE)} models (llama.cpp "
                        "architectures llama and qwen2); this one is not supported yet")  # fmt: skip
    return EXPORTABLE[mt]


def name_map(model_type: str | None, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's map of HF tensor names to GGUF ones for this model's architecture (any architecture gguf knows)."""
    mt = model_type or ""
    arch = EXPORTABLE.get(mt, (mt, False))[0]
    try:
        return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    except KeyError:
        raise LlmqError(f"model_type {mt!r} has no llama.cpp architecture in gguf-py") from None


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight'."""
    g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if g is None:
        raise LlmqError(f"{hf_name}: llama.cpp has no tensor of this name (gguf-py's tensor map)")
    return g


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the output rows of q_proj (n_head heads) or k_proj (n_kv_head):
    any per-row data (weights, block bytes, biases) moves with its row."""
    R = rows.shape[0]
    return rows.reshape(n_head, 2, R // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
