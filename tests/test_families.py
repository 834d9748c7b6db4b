"""Model families found by discovery (llmq/archs.py), each a tiny random-init model from transformers' own config
class: the groups a run of the layer shows, the hand-written tables of the five families llmq listed before (equal),
and every family through GPTQ, RTN, the written checkpoint, from_pretrained, on-the-fly quantization, the streamed
CLI conversion and the compressed-tensors export."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, make_tokenizer
from tiny import FAMILIES, TINY

import llmq
from llmq import pipeline
from llmq.algorithms.rtn import rtn
from llmq.archs import ArchSpec, arch_for
from llmq.cli import main
from llmq.config import GPTQConfig, QuantPlan, QuantScheme
from llmq.errors import LlmqError
from llmq.nn import QuantLinear

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = ArchSpec("model.layers", (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
                  blocks=(("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")))  # fmt: skip
# what llmq/archs.py listed by hand before discovery (its last hand-written version)
HAND_WRITTEN = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt2": ArchSpec("transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)), True,
                     (("attn", "attn.c_proj"), ("mlp", "mlp.c_proj"))),
    "opt": ArchSpec("model.decoder.layers", (_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
                    blocks=(("self_attn", "self_attn.out_proj"), ("fc2", "fc2"))),
}  # fmt: skip
# what a run of each new family's layer must show (groups of one input, in order)
EXPECTED = {
    "phi3": (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "glm4": (_ATTN, ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "deepseek_v3": (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
                    ("self_attn.kv_b_proj",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
}  # fmt: skip
for _f in FAMILIES:
    EXPECTED.setdefault(_f, _LLAMA.sequential)


@pytest.mark.parametrize("arch", list(HAND_WRITTEN))
def test_discovery_equals_the_hand_written_tables(arch):
    """The five families llmq listed by hand: the same layers, groups in the same order, the same replayable blocks
    (so their conversions are the same computation: the same checkpoints, bit for bit)."""
    assert arch_for(make_tiny(arch).config) == HAND_WRITTEN[arch]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_discovered_groups(arch):
    spec = arch_for(make_tiny(arch).config)
    assert spec.layers == "model.layers" and not spec.transposed
    assert spec.sequential == EXPECTED[arch]
    assert ("mlp", "mlp.down_proj") in spec.blocks


def refusal(config_kwargs: dict, model_type: str) -> str:
    from transformers import AutoConfig

    with pytest.raises(LlmqError) as e:
        arch_for(AutoConfig.for_model(model_type, **config_kwargs))
    return str(e.value)


def test_nothing_discoverable_is_refused_with_what_was_found():
    import time

    t0 = time.perf_counter()
    assert "encoder-only" in refusal({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}, "bert")
    assert "no causal LM" in refusal({}, "distilbert")
    vlm = refusal({}, "gemma3")
    assert "vision-language model" in vlm and "text_config" in vlm and "vision_tower" in vlm
    moe = refusal(TINY["llama"] | {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128,
                                   "head_dim": 16}, "llama4_text")  # fmt: skip
    assert "Llama4TextExperts" in moe and "layout" in moe
    assert time.perf_counter() - t0 < 20


def err(Wq: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's objective: the output error tr(ΔW H ΔWᵀ) on the inputs H was accumulated from."""
    D = Wq - W
    return float(torch.einsum("ij,jk,ik->", D, H, D))


def fake_quantized_logits(arch: str, qweights: dict, x: torch.Tensor) -> torch.Tensor:
    model = make_tiny(arch)
    llmq.fake_quantize(model, qweights, torch.float32)
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_gptq_beats_rtn_on_every_linear_and_loads_as_fake_quantized(arch, tmp_path):
    """GPTQ through the pipeline (true-sequential groups, replayed blocks): on every linear, its output error on the
    inputs it was fitted to, tr(ΔW H ΔWᵀ), is below RTN's on the same grid; the written checkpoint, loaded back,
    computes the fake-quantized model's logits."""
    model = make_tiny(arch)
    scheme = QuantScheme(bits=3, group_size=32)
    calib = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    seen, real = {}, pipeline.solve.gptq

    def spy(W, H, s, cfg, name):
        seen[name] = (W.detach().clone(), H.detach().clone())
        return real(W, H, s, cfg, name)

    pipeline.solve.gptq = spy
    try:
        qw = llmq.quantize(model, scheme, calib, method="gptq", gptq=GPTQConfig())
    finally:
        pipeline.solve.gptq = real
    assert set(seen) == set(qw) and len(qw) == 2 * len(arch_for(model.config).linears)
    for name, (W, H) in seen.items():
        assert err(qw[name].dequantize(), W, H) < err(rtn(W, scheme).dequantize(), W, H), name
    llmq.save_quantized(model, qw, tmp_path / "q", QuantPlan(scheme), {"name": "gptq"}, dtype=torch.float32)
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    q = llmq.load_quantized(tmp_path / "q", backend="reference")
    with torch.no_grad():
        got = q(x).logits
    want = fake_quantized_logits(arch, qw, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), (got - want).abs().max()


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_cli_on_the_fly_and_compressed_tensors(arch, tmp_path):
    """The streamed CLI conversion (RTN) loads through from_pretrained with the fake-quantized model's logits;
    on-the-fly NF4 from the fp checkpoint computes the same as RTN NF4 of it; the compressed-tensors export loads in
    transformers with llmq's logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = tmp_path / "src"
    make_tiny(arch, vocab=300).save_pretrained(src)
    make_tokenizer(300).save_pretrained(src)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--quiet", "--bits", "4", "--group-size", "16"]) == 0
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    q.eval()
    llmq.set_backend(q, "reference")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    scheme = QuantScheme(bits=4, group_size=16)  # divides DeepSeek-V3's kv_b_proj input (kv_lora_rank 16)
    names = pipeline.linear_shapes(fp)
    qw = {n: rtn(fp.get_submodule(n).weight.detach().float(), scheme) for n in names}
    with torch.no_grad():
        ours = q(x).logits
        llmq.fake_quantize(fp, qw, torch.float16)
        want = fp(x).logits
    assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    otf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=llmq.LlmqConfig(
        "nf4", backend="reference")).eval()  # fmt: skip
    assert sum(isinstance(m, QuantLinear) for m in otf.modules()) == len(names)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    nf4 = QuantScheme(format="nf4", group_size=64)
    llmq.fake_quantize(fp, {n: rtn(fp.get_submodule(n).weight.detach().float(), nf4) for n in names}, torch.float32)
    with torch.no_grad():
        want = fp(x).logits
        assert torch.allclose(otf(x).logits, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--to", "compressed-tensors", "--quiet"]) == 0
    # asymmetric: transformers' compressed path mis-sizes packed zero points, so compressed-tensors dequantizes (as
    # tests/test_export.py does for every asymmetric scheme)
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(ct(x).logits, ours, rtol=1e-3, atol=1e-3 * ours.abs().max())


def test_dry_run_shows_the_groups_and_writes_nothing(tmp_path, capsys):
    import json

    src = tmp_path / "src"
    make_tiny("deepseek_v3").save_pretrained(src)
    assert main(["quantize", str(src), str(tmp_path / "out"), "--dry-run", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [[m["name"] for m in g] for g in found["groups"]] == [list(g) for g in EXPECTED["deepseek_v3"]]
    assert found["groups"][2] == [{"name": "self_attn.kv_b_proj", "shape": [4 * (8 + 16), 16]}]  # heads·(nope+v), rank
    assert found["not_quantized"]["outside the decoder layers"] == ["lm_head"] and found["n_layers"] == 2
    assert not (tmp_path / "out").exists()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "6 groups" in text and "2. self_attn.q_b_proj" in text and not (tmp_path / "out").exists()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--dry-run", "--rotate", "hadamard"]) == 2
    assert "cannot be rotated" in capsys.readouterr().err


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_torchrun_and_mixed_precision(arch, tmp_path):
    """Two ranks (gloo) convert every family as one process does (codes within 1%: reordered Hessian sums); mixed
    precision allocates over the discovered linears and the result loads."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import SAMPLE_TEXT

    src = tmp_path / "src"
    make_tiny(arch, vocab=300).save_pretrained(src)
    make_tokenizer(300).save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    args = ["--method", "gptq", "--nsamples", "4", "--seqlen", "32", "--group-size", "16", "--calib",
            str(tmp_path / "calib.txt"), "--quiet"]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), "-m", "llmq", "quantize", str(src),
                        str(tmp_path / "d2"), *args], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert main(["quantize", str(src), str(tmp_path / "d1"), *args]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(next((tmp_path / d).glob("model-*.safetensors"))) for d in ("d1", "d2"))
    assert a.keys() == b.keys()
    codes = [k for k in a if k.endswith("qweight")]
    assert sum(int((a[k] != b[k]).sum()) for k in codes) <= 0.01 * sum(a[k].numel() for k in codes)
    assert json.loads((tmp_path / "d2" / "summary.json").read_text())["distributed"]["world_size"] == 2
    assert main(["quantize", str(src), str(tmp_path / "mixed"), *args, "--target-bpw", "4.5"]) == 0
    qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert len({json.dumps(v) for v in qc.get("overrides", {}).values()}) >= 1
    llmq.load_quantized(tmp_path / "mixed")
