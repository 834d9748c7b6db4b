"""Write the v1 checkpoint fixtures in tests/data/ (run from the repo root: python tests/data/make_v1_fixture.py).

The fixtures were written by commit 9a40314 (the last commit before the checkpoint record/codec redesign) and are
kept as they were written: tests/test_legacy.py loads them with the current code and checks that every quantized
module dequantizes to exactly the same bits (sha256 of the fp32 dequantized weight) and that the logits match.
Rerunning this script with newer code must reproduce the same files; it is here to say how they were made.

Each fixture is a tiny random-init model (llama, with one scheme per linear covering every stored part: codes at
2/3/4/8 bits, NF4/NF3/NF2, asymmetric zeros, symmetric, double-quantized scales, bf16/fp32 scales, outliers, an
act-order permutation, ragged groups, per-channel, per-tensor and a linear split by output row; gpt2, whose
Conv1D stores [in, out]).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import llmq
from llmq.algorithms.gptq import gptq
from llmq.algorithms.rtn import rtn
from llmq.config import GPTQConfig, QuantPlan, RowSplit, scheme_from_name
from llmq.qtensor import RowSplitWeight

HERE = Path(__file__).resolve().parent

LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)

LLAMA_SCHEMES = {  # module (relative to model.layers) -> scheme name; the default is int4-asym-g32
    "0.self_attn.q_proj": "nf4-g32-dq",
    "0.self_attn.k_proj": "int3-sym-g32-out0.01",
    "0.self_attn.v_proj": "nf3-g32",
    "0.self_attn.o_proj": "int8-pc",
    "0.mlp.gate_proj": "int2-g32-clip",
    "0.mlp.up_proj": "nf2-g64-dq",
    "0.mlp.down_proj": "int4-g48",  # GPTQ, act-order without static groups: stores perm; 160 = 3 x 48 + 16
    "1.self_attn.q_proj": "int4-pt",
    "1.self_attn.v_proj": "int3-g32-dq",
    "1.mlp.gate_proj": "int4-sym-g16",
}
SCALE_DTYPES = {"1.mlp.up_proj": "bfloat16", "1.self_attn.o_proj": "float32"}
SPLIT = ("1.self_attn.k_proj", ("int2-g32-dq", "nf4-g32", "int8-pc"))  # 32 rows, split three ways


def make_model(model_type: str, **over):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=256, **over)
    return AutoModelForCausalLM.from_config(cfg).eval()


def llama_fixture() -> tuple:
    model = make_model("llama", **LLAMA)
    default = scheme_from_name("int4-g32")
    overrides = {f"model.layers.{k}": scheme_from_name(v) for k, v in LLAMA_SCHEMES.items()}
    overrides |= {f"model.layers.{k}": scheme_from_name("int4-g32", scale_dtype=v) for k, v in SCALE_DTYPES.items()}
    split_name = f"model.layers.{SPLIT[0]}"
    part = tuple(i % 3 for i in range(32))
    splits = {split_name: RowSplit(tuple(scheme_from_name(s) for s in SPLIT[1]), part)}
    plan = QuantPlan(default, overrides, splits)
    g = torch.Generator().manual_seed(1)
    qweights = {}
    for i, layer in enumerate(model.model.layers):
        for rel, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            name = f"model.layers.{i}.{rel}"
            W = mod.weight.detach().float()
            if name.endswith("0.mlp.down_proj"):
                X = torch.randn(512, W.shape[1], generator=g) * torch.linspace(0.2, 3.0, W.shape[1])
                qweights[name] = gptq(W, 2 * X.T @ X / 512, plan.scheme_for(name), GPTQConfig(static_groups=False))
                assert qweights[name].perm is not None
            elif name in splits:
                qweights[name] = RowSplitWeight.quantize(W, splits[name], rtn)
            else:
                qweights[name] = rtn(W, plan.scheme_for(name))
    return model, qweights, plan


def gpt2_fixture() -> tuple:
    model = make_model("gpt2", **GPT2, tie_word_embeddings=True)
    plan = QuantPlan(scheme_from_name("int4-g32"), {"transformer.h.1.mlp.c_fc": scheme_from_name("nf4-g64-dq")})
    qweights = llmq.quantize(model, plan)
    return model, qweights, plan


def write(name: str, model, qweights, plan) -> None:
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    llmq.save_quantized(model, qweights, out, plan, {"name": "fixture", "written_by": "tests/data/make_v1_fixture.py"},
                        dtype=torch.float16)  # fmt: skip
    loaded = llmq.load_quantized(out, backend="reference")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(x).logits
    digests = {}
    for m in json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"]:
        W = loaded.get_submodule(m).quantized_weight().dequantize(torch.float32).contiguous()
        digests[m] = hashlib.sha256(W.numpy().tobytes()).hexdigest()
    save_file({"input_ids": x, "logits": logits.contiguous()}, str(HERE / f"{name}.expected.safetensors"))
    (HERE / f"{name}.expected.json").write_text(json.dumps({"dequantized_sha256": digests}, indent=1) + "\n")
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir())} bytes)", file=sys.stderr)


if __name__ == "__main__":
    write("v1_llama", *llama_fixture())
    write("v1_gpt2", *gpt2_fixture())
