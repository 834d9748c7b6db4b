"""Tiny random-init models per architecture and an offline tokenizer for them: for the tests, and for scripts that
run where pytest is not installed (benchmarks/gpu_check.py on a GPU machine)."""
from __future__ import annotations

import torch

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0),
    "opt": dict(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1),
}  # fmt: skip
_BASE = TINY["llama"]
# families found by discovery (llmq/archs.py), each with what sets it apart: q/k norms (qwen3), 1 + w norms, soft-capping,
# sliding windows, a tied head (gemma2/3), fused qkv and gate_up (phi3), norms after attention and MLP (olmo2),
# MLA attention (deepseek_v3, dense layers), fused gate_up and extra norms (glm4), residual/logit multipliers
# (granite), NoPE layers (smollm3)
FAMILIES = {
    "qwen3": {**_BASE, "head_dim": 16},
    # query_pre_attn_scalar = head_dim as in every released Gemma but 27B (llama.cpp computes that scale itself)
    "gemma2": {**_BASE, "head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {**_BASE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {**_BASE, "pad_token_id": 0},
    "olmo2": {**_BASE, "pad_token_id": 0},
    "deepseek_v3": {**_BASE, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "head_dim": 8, "first_k_dense_replace": 2, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "glm4": {**_BASE, "pad_token_id": 0, "head_dim": 16},
    # Granite 3's multipliers (all 1.0 by default: an attention scale of 1 no released Granite has)
    "granite": {**_BASE, "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                "attention_multiplier": 0.0625},
    "smollm3": {**_BASE, "pad_token_id": 0},
}  # fmt: skip
TINY |= FAMILIES


def make_tiny(model_type: str, vocab: int = 256, seed: int = 0, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **(TINY[model_type] | over))
    return AutoModelForCausalLM.from_config(cfg).eval()


SAMPLE_TEXT = " ".join(
    f"The {w} of the {v} was {n} in {y}, and it is said that many {w}s were seen." for w, v, n, y in zip(
        ["river", "castle", "king", "song", "ship", "city"] * 40, ["north", "valley", "empire", "people"] * 60,
        ["built", "found", "sung", "lost", "named"] * 48, [str(1800 + i) for i in range(240)])
)  # fmt: skip


def make_tokenizer(vocab: int = 256):
    """A byte-level BPE tokenizer trained offline on SAMPLE_TEXT (the tiny models have none of their own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")

# mixtures of experts (llmq/moe.py): 4 experts, top 2; DeepSeek-V3 with one dense layer first and a shared expert;
# gpt-oss with interleaved gate/up, biases and sliding windows
_MOE = {**_BASE, "num_hidden_layers": 2}
MOE = {
    "mixtral": {**_MOE, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96},
    "qwen3_moe": {**_MOE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                  "norm_topk_prob": True,
                  "intermediate_size": 160},
    "olmoe": {**_MOE, "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "pad_token_id": 0},
    "deepseek_v3": {**_MOE, "num_hidden_layers": 3, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "first_k_dense_replace": 1,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96, "n_group": 1,
                    "topk_group": 1, "n_shared_experts": 1},
    "gpt_oss": {**_MOE, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
                "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
}  # fmt: skip


def make_tiny_moe(model_type: str, vocab: int = 256, seed: int = 0, **over):
    """A tiny random-init MoE model (fused experts, as transformers builds it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **(MOE[model_type] | over))
    return AutoModelForCausalLM.from_config(cfg).eval()
