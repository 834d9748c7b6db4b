"""llama.cpp's tensor-type choices, so that an llmq conversion stores the same GGUF type in every tensor as
`llama-quantize` would: the fallback of a block format for rows it cannot hold, and its named mixes ("Q4_K_M",
"Q3_K_M", ...) as a QuantPlan.

This is llama-quant.cpp's `llama_tensor_get_type` (llama.cpp as vendored in llama-cpp-python 0.3.36) for dense
models: the per-category rules of each mix (attn_v / ffn_down get more bits in some layers, attn_output in the
Q3_K mixes), the tied-embedding / output rule, and `tensor_type_fallback` for rows that are no multiple of a block.
Not reproduced: MoE (8-expert) and 70B-specific bumps, Falcon, and the IQ mixes (llmq has no IQ grids).
`tests/test_gguf.py` pins the rules; benchmarks/gguf_bench.py checks them against llama-quantize's own choices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import gguf_names
from .config import QuantPlan, QuantScheme
from .errors import LlmqError
from .formats import ggml

log = logging.getLogger("llmq")

# mix name -> the type of a tensor no rule touches (llama.cpp's ftype -> default_type)
MIXES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
         "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k", "Q4_K_M": "q4_k",
         "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k"}  # fmt: skip
CATEGORIES = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Tensor:
    """What the rules look at: the GGUF category (attn_v, ffn_down, ...), the layer, the row length."""

    category: str
    layer: int
    in_features: int


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, t: Tensor, n_layers: int, n_gqa: int = 1, calibrated: bool = False, n_expert: int = 0) -> str:
    """The block type llama.cpp's mix `mix` gives tensor `t` (before the shape fallback). `calibrated`: the conversion
    has calibration data, like llama-quantize with an importance matrix (it changes Q4_0/Q5_0's early ffn_down).
    `n_expert`: a mixture of experts' expert count (llama-quantize gives 8-expert models 8-bit attn_k / attn_v and
    5-bit attn_output; the experts' ffn_*_exps follow the ffn_* rules)."""
    base = check_mix(mix)
    cat, i, n = t.category.removesuffix("_exps"), t.layer, n_layers
    if n_expert == 8 and cat in ("attn_v", "attn_k"):
        return "q8_0"
    if n_expert == 8 and cat == "attn_output" and mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
        return "q5_k"
    if cat == "attn_v":
        rules = {"Q2_K": "q4_k" if n_gqa >= 4 else "q3_k", "Q3_K_M": "q5_k" if i < 2 else "q4_k", "Q3_K_L": "q5_k",
                 "Q4_K_M": "q6_k" if _more_bits(i, n) else base, "Q5_K_M": "q6_k" if _more_bits(i, n) else base,
                 "Q4_K_S": "q5_k" if i < 4 else base}  # fmt: skip
        return rules.get(mix, base)
    if cat == "ffn_down":
        if mix == "Q2_K":
            return "q3_k"
        if mix == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if mix == "Q3_K_L":
            return "q5_k"
        if mix in ("Q4_K_M", "Q5_K_M"):
            return "q6_k" if _more_bits(i, n) else base
        if mix == "Q4_K_S" and i < n // 8:
            return "q5_k"
        if mix in ("Q4_0", "Q5_0") and calibrated and i < n // 8:
            return {"Q4_0": "q4_1", "Q5_0": "q5_1"}[mix]
        return base
    if cat == "attn_output":
        return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(mix, base)
    if cat == "attn_qkv":
        return {"Q3_K_M": "q4_k", "Q3_K_L": "q4_k", "Q4_K_M": "q5_k", "Q5_K_M": "q6_k"}.get(mix, base)
    return base


def output_type(mix_or_type: str, in_features: int) -> str:
    """The type of the output head (and of tied token embeddings): q6_k, or q8_0 when the rows are no multiple of the
    mix's block or the mix is Q8_0; then the shape fallback. `mix_or_type`: a mix name or a block type."""
    base = MIXES.get(mix_or_type, mix_or_type)
    t = "q8_0" if base == "q8_0" or in_features % ggml.TYPES[base].block else "q6_k"
    return ggml.fallback(t, in_features) or "f16"


def check_mix(mix: str) -> str:
    if mix not in MIXES:
        raise LlmqError(f"--gguf-recipe {mix!r} is not known; use one of {', '.join(MIXES)}")
    return MIXES[mix]


def fitted(scheme: QuantScheme, in_features: int, name: str = "") -> QuantScheme:
    """`scheme`, or llama.cpp's fallback block type when `scheme` is a block format whose block does not divide
    in_features (q4_k -> q5_0, ...: formats.ggml.FALLBACK)."""
    if scheme.block is None or ggml.fits(scheme.format, in_features):
        return scheme
    fb = ggml.fallback(scheme.format, in_features)
    if fb is None:
        raise LlmqError(f"{name or 'a linear'}: in_features {in_features} is no multiple of 32, so no llama.cpp block "
                        "type holds it (llama.cpp keeps such a tensor in F16); quantize it with an int or nf "
                        "format")  # fmt: skip
    return QuantScheme(format=fb, clip_search=scheme.clip_search)


def resolve_shapes(plan: QuantPlan, shapes: dict[str, tuple[int, int]]) -> tuple[QuantPlan, dict[str, str]]:
    """Give every linear whose rows a block format cannot hold llama.cpp's fallback type (logged). Returns the plan
    and {linear: 'q4_k -> q5_0'} for those. A plan naming a module that is not one of `shapes` is refused (a typo,
    or a module llmq keeps in full precision: a mixture of experts' router)."""
    unknown = [n for n in (*plan.overrides, *plan.row_splits) if n not in shapes]
    if unknown:
        n = unknown[0]
        router = n.rpartition(".")[2] in ("gate", "router", "shared_expert_gate") and not n.endswith("_proj")
        why = ("it is a mixture of experts' router, which llmq keeps in full precision (vLLM and llama.cpp read routers "
               "unquantized; a quantized router changes which experts run)") if router else \
            f"it is not one of the model's {len(shapes)} quantizable linears (e.g. {next(iter(shapes), '-')})"
        raise LlmqError(f"the plan names {n!r}" + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
                        + f": {why}")  # fmt: skip
    overrides, changed = dict(plan.overrides), {}
    for name, (_, cols) in shapes.items():
        s = plan.scheme_for(name)
        if name in plan.row_splits or (f := fitted(s, cols, name)) is s:
            continue
        overrides[name] = f
        changed[name] = f"{s.format} -> {f.format}"
    if changed:
        log.info("llama.cpp's fallback for rows no block fits: %d linear(s), e.g. %s", len(changed),
                 next(iter(changed.items())))  # fmt: skip
    return QuantPlan(plan.default, overrides, plan.row_splits), changed


def recipe_plan(mix: str, tensors: dict[str, Tensor], n_layers: int, n_gqa: int, calibrated: bool,
                clip_search: bool, n_expert: int = 0) -> QuantPlan:  # fmt: skip
    """The QuantPlan of llama.cpp's mix `mix` for linears `tensors` (name -> Tensor), before the shape fallback."""
    base = QuantScheme(format=check_mix(mix), clip_search=clip_search)
    overrides = {}
    for name, t in tensors.items():
        f = mix_type(mix, t, n_layers, n_gqa, calibrated, n_expert)
        if f != base.format:
            overrides[name] = QuantScheme(format=f, clip_search=clip_search)
    return QuantPlan(base, overrides)


def gguf_tensors(model_type: str, shapes: dict[str, tuple[int, int]], n_layers: int) -> dict[str, Tensor]:
    """name -> Tensor for linears of [out, in] `shapes`, their categories from gguf-py's tensor name map."""
    names = gguf_names.name_map(model_type, n_layers)
    out = {}
    for n, (_, cols) in shapes.items():
        g = names.get_name(gguf_names.stacked(n))  # an expert's linear: the stacked tensor it is one slice of
        if g is None or not g.startswith("blk."):
            raise LlmqError(f"{n}: no llama.cpp tensor of this name in gguf-py's map for {model_type}")
        _, layer, cat = g.split(".", 2)
        out[n] = Tensor(cat, int(layer), cols)
    return out
