"""The layer-by-layer pipeline on every supported architecture, calibration data, and the GPTQ CLI."""
import json

import pytest
import torch
from conftest import make_tiny, make_tokenizer

import llmq
from llmq.calibration import calibration_windows, draw_windows
from llmq.cli import main
from llmq.config import CalibConfig, GPTQConfig, QuantPlan, QuantScheme
from llmq.errors import LlmqError

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_quantizes_loads_and_generates(arch, tmp_path):
    model = make_tiny(arch)
    ref = make_tiny(arch)
    calib = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=4, group_size=32)
    qw = llmq.quantize(model, scheme, calib, method="gptq", gptq=GPTQConfig())
    assert len(qw) == len(llmq.archs.arch_for(model.config).linears) * 2
    llmq.save_quantized(model, qw, tmp_path / "q", QuantPlan(scheme), {"name": "gptq"}, dtype=torch.float32)
    q = llmq.load_quantized(tmp_path / "q", backend="reference")
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (q(x).logits - model(x).logits).abs().max() < 1e-4  # the model holds its fake-quantized weights
        # GPTQ is closer to the full-precision model than RTN on the same grid
        y = ref(x).logits
        rtn = make_tiny(arch)
        llmq.fake_quantize(rtn, llmq.quantize(rtn, scheme), torch.float32)
        assert (q(x).logits - y).square().mean() < (rtn(x).logits - y).square().mean()
    out = q.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 25)


def test_an_architecture_nobody_listed_is_discovered():
    """GPT-NeoX (fused query_key_value; parallel residual: attention and MLP each read their own norm of the layer's
    input): no line of llmq names it; a run of its layer gives the groups."""
    from transformers import AutoConfig

    spec = llmq.archs.arch_for(AutoConfig.for_model("gpt_neox", hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128))  # fmt: skip
    assert spec.layers == "gpt_neox.layers" and "attention.query_key_value" in spec.linears
    assert len(spec.linears) == 4


def test_gptq_cli_writes_per_layer_report(tiny_dir, sample_text, tmp_path):
    src = tiny_dir("llama", tokenizer=True)
    out = tmp_path / "q"
    rc = main(["quantize", str(src), str(out), "--method", "gptq", "--calib", str(sample_text), "--nsamples", "4",
               "--seqlen", "32", "--bits", "3", "--group-size", "32", "--quiet"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"]["name"] == "gptq" and summary["method"]["calibration"]["nsamples"] == 4
    assert [r["index"] for r in summary["layers"]] == [0, 1]
    assert all(0 < r["rel_error"] < 1 for r in summary["layers"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"]["gptq"]["act_order"] is True
    llmq.load_quantized(out)


def test_fp_inputs_fit_every_linear_to_the_fp_models_activations():
    """inputs="fp": each linear's GPTQ weight is the one its H from the fp model's activations gives (the
    sensitivity table's A, from a whole-model pass); "quantized": past layer 0's q/k/v, H sees quantized linears."""
    from llmq.algorithms.gptq import gptq
    from llmq.sensitivity import layer_stats

    calib = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=3, group_size=32)
    stats = layer_stats(make_tiny("llama"), calib)
    fp = llmq.quantize(make_tiny("llama"), scheme, calib, method="gptq", gptq=GPTQConfig(inputs="fp"))
    seq = llmq.quantize(make_tiny("llama"), scheme, calib, method="gptq", gptq=GPTQConfig())
    ref = make_tiny("llama")
    for name, st in stats.items():
        W = ref.get_submodule(name).weight.detach()
        expect = gptq(W, 2 * st.A, scheme, GPTQConfig()).dequantize()
        got = fp[name].dequantize()
        assert torch.allclose(got, expect, atol=1e-5), name
    same = lambda n: torch.equal(fp[n].dequantize(), seq[n].dequantize())  # noqa: E731
    assert same("model.layers.0.self_attn.q_proj") and same("model.layers.0.self_attn.v_proj")  # fp inputs in both
    assert not same("model.layers.0.mlp.gate_proj") and not same("model.layers.1.self_attn.q_proj")


def test_unknown_gptq_inputs_is_refused():
    with pytest.raises(LlmqError, match="inputs='fpx' is not known; use one of quantized, fp"):
        GPTQConfig(inputs="fpx")


# ---- calibration --------------------------------------------------------------------------------
def test_windows_are_seeded_and_in_range():
    tokens = torch.arange(10_000)
    cfg = CalibConfig(nsamples=8, seqlen=100, seed=3, token_range=(0.5, 1.0))
    a, b = draw_windows(tokens, cfg), draw_windows(tokens, cfg)
    assert torch.equal(a, b) and a.shape == (8, 100)
    assert a.min() >= 5000
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    assert not torch.equal(a, draw_windows(tokens, CalibConfig(nsamples=8, seqlen=100, seed=4, token_range=(0.5, 1))))


def test_text_too_short():
    with pytest.raises(LlmqError, match=r"has 1,000 tokens, fewer than nsamples × seqlen = 8 × 200 = 1,600"):
        draw_windows(torch.arange(1000), CalibConfig(nsamples=8, seqlen=200))


def test_sources(tmp_path, sample_text):
    tok = make_tokenizer(300)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in sample_text.read_text().split(", ")))
    for src in (str(sample_text), str(jl)):
        w = calibration_windows(CalibConfig(source=src, nsamples=2, seqlen=16), tok)
        assert w.shape == (2, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(LlmqError, match="'text' field"):
        calibration_windows(CalibConfig(source=str(bad), nsamples=1, seqlen=4), tok)
    with pytest.raises(LlmqError, match="unknown dataset name; pass a .txt/.jsonl file"):
        calibration_windows(CalibConfig(source="wikitext3", nsamples=1, seqlen=4), tok)
    with pytest.raises(LlmqError, match="no such file"):
        calibration_windows(CalibConfig(source=str(tmp_path / "nope.txt"), nsamples=1, seqlen=4), tok)


def test_wikitext_dir_split(wikitext):
    tok = make_tokenizer(300)
    with pytest.raises(LlmqError, match="no wiki.train.raw"):
        calibration_windows(CalibConfig(source=str(wikitext), nsamples=1, seqlen=8, split="train"), tok)
    assert calibration_windows(CalibConfig(source=str(wikitext), nsamples=2, seqlen=8, split="test"), tok).shape == (2, 8)
