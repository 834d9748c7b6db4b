"""transformers integration: from_pretrained of llmq checkpoints, on-the-fly quantization, backends, safety."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq import LlmqConfig
from llmq.algorithms.rtn import rtn
from llmq.cli import main
from llmq.config import QuantScheme
from llmq.errors import LlmqError
from llmq.nn import QuantLinear

# Stated tolerances, relative Frobenius error of a layer's output against the reference backend:
CPU_INT4_TOL = 1e-2  # the native int4 op takes bf16 activations (8-bit mantissa)
CPU_INT8_TOL = 1e-2  # the int8 path also runs bf16 activations (its fp32 path is ~14x slower)


@pytest.fixture
def qdir(tiny_dir, tmp_path):
    def make(*args, arch="llama"):
        out = tmp_path / f"q-{arch}-{'_'.join(args)}"
        assert main(["quantize", str(tiny_dir(arch)), str(out), "--quiet", "--dtype", "float32", *args]) == 0
        return out

    return make


def logits(model, seed=0):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("args", [["--bits", "4"], ["--format", "nf4", "--group-size", "64", "--double-quant"],
                                  ["--bits", "3", "--outliers", "0.01"], ["--bits", "8", "--group-size", "-1"],
                                  ["--bits", "8", "--group-size", "-1", "--outliers", "0.02"],
                                  ["--format", "nf3", "--group-size", "32"],
                                  ["--format", "nf2", "--group-size", "32"],
                                  ["--format", "fp4", "--group-size", "32", "--double-quant"]])  # fmt: skip
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_pretrained_equals_load_quantized(qdir, args, arch):
    d = qdir(*args, arch=arch)
    ref = llmq.load_quantized(d, backend="reference")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert any(isinstance(x, QuantLinear) for x in m.modules())
    llmq.set_backend(m, "reference")
    assert torch.equal(logits(m), logits(ref))  # same tensors, same reference math: exact
    auto = llmq.load_quantized(d)  # cpu backend where it serves (int4 / int8 here)
    tol = CPU_INT4_TOL if args == ["--bits", "4"] else CPU_INT8_TOL  # nf4 / int3: reference either way
    assert rel(logits(auto), logits(ref)) < tol
    x = torch.randint(0, 256, (1, 8))
    assert m.generate(x, max_new_tokens=6, do_sample=False).shape == (1, 14)


def test_generate_with_kv_cache_matches_no_cache(qdir):
    m = AutoModelForCausalLM.from_pretrained(qdir("--bits", "4"), dtype=torch.float32)
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    a = m.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    b = m.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_compile_decoding_matches_eager(qdir):
    """Static KV cache + torch.compile'd decoding (the fast CPU path) gives the eager tokens, and the cpu int4
    backend traces (the logits of the two paths differ only by compiler rounding)."""
    m = AutoModelForCausalLM.from_pretrained(qdir("--bits", "4", "--group-size", "32"), dtype=torch.float32)
    assert {q.backend for q in m.modules() if isinstance(q, QuantLinear)} == {"cpu"}
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    eager = m.generate(x, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    llmq.compile_decoding(m, max_cache_len=32)
    fast = m.generate(x, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(eager.sequences, fast.sequences)
    assert max(rel(a, b) for a, b in zip(fast.scores, eager.scores)) < 1e-3
    again = m.generate(x, max_new_tokens=4, do_sample=False)  # a shorter call reuses the compiled graph
    assert torch.equal(again, eager.sequences[:, :12])


@pytest.mark.parametrize("method, kw, cli", [
    ("rtn", dict(bits=4, group_size=128), ["--bits", "4", "--group-size", "128"]),
    ("rtn", dict(bits=3, group_size=32, sym=True, outliers=0.01), ["--bits", "3", "--group-size", "32", "--sym", "--outliers", "0.01"]),
    ("nf4", dict(double_quant=True), ["--format", "nf4", "--group-size", "64", "--double-quant"]),
    ("nf3", dict(double_quant=True), ["--format", "nf3", "--group-size", "64", "--double-quant"]),
    ("nf2", dict(group_size=32), ["--format", "nf2", "--group-size", "32"]),
    ("fp4", dict(double_quant=True), ["--format", "fp4", "--group-size", "64", "--double-quant"]),
])  # fmt: skip
def test_on_the_fly_equals_offline_cli_bit_for_bit(tiny_dir, tmp_path, method, kw, cli):
    src = tiny_dir("llama")
    off = tmp_path / "offline"
    assert main(["quantize", str(src), str(off), "--quiet", "--dtype", "float32", *cli]) == 0
    otf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=LlmqConfig(method=method, **kw))
    ref = llmq.load_quantized(off)
    a, b = otf.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # save -> load round trip, both ways back
    otf.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(llmq.load_quantized(tmp_path / "saved")), logits(otf))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.equal(logits(again), logits(otf))


def test_gptq_on_the_fly_points_to_cli():
    with pytest.raises(LlmqError, match="llmq quantize MODEL OUT --method gptq"):
        LlmqConfig(method="gptq")


def test_without_import_llmq_loading_fails_loudly(qdir):
    d = qdir("--bits", "4")
    code = f"from transformers import AutoModelForCausalLM as A; A.from_pretrained({str(d)!r}); print('SILENTLY LOADED')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "SILENTLY LOADED" not in r.stdout
    assert "llmq" in r.stderr  # transformers names the unknown quant_method before failing


def test_wrong_version_and_missing_tensor_name_the_module(qdir, monkeypatch):
    d = qdir("--bits", "4")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmqError, match="format_version 7"):
        AutoModelForCausalLM.from_pretrained(d)
    d2 = qdir("--bits", "3")
    from safetensors.torch import load_file, save_file

    shard = next(d2.glob("model-*.safetensors"))
    t = load_file(shard)
    del t["model.layers.1.self_attn.o_proj.scales"]
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(LlmqError, match=f"{shard.name}: checksum mismatch"):  # by default, the checksum first
        AutoModelForCausalLM.from_pretrained(d2)
    monkeypatch.setenv("LLMQ_VERIFY", "0")  # without it, the header check names the tensor
    with pytest.raises(LlmqError, match=r"model.layers.1.self_attn.o_proj: missing tensor\(s\) model.layers.1.self_attn.o_proj.scales"):
        AutoModelForCausalLM.from_pretrained(d2)


def test_backend_that_cannot_serve_names_the_module(qdir, monkeypatch):
    d = qdir("--format", "nf4", "--group-size", "32")
    monkeypatch.setenv("LLMQ_BACKEND", "cpu")
    with pytest.raises(LlmqError, match=r"model.layers.0.self_attn.q_proj: backend 'cpu' cannot serve nf4-g32"):
        AutoModelForCausalLM.from_pretrained(d)
    monkeypatch.setenv("LLMQ_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (test_kernels sets it for the interpreter)
    with pytest.raises(LlmqError, match="backend 'triton' cannot serve"):
        llmq.load_quantized(d)
    monkeypatch.delenv("LLMQ_BACKEND")
    m = AutoModelForCausalLM.from_pretrained(d)
    with pytest.raises(LlmqError, match=r"model.layers.0.self_attn.q_proj: backend 'cpu' cannot serve"):
        llmq.set_backend(m, "cpu")


# ---- backends -----------------------------------------------------------------------------------
def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme, tol", [
    (QuantScheme(bits=4, group_size=128), CPU_INT4_TOL), (QuantScheme(bits=4, group_size=32, sym=True), CPU_INT4_TOL),
    (QuantScheme(bits=4, group_size=-1, double_quant=True), CPU_INT4_TOL),
    (QuantScheme(bits=4, group_size=64, outliers=0.01), CPU_INT4_TOL),
    (QuantScheme(bits=8, group_size=-1), CPU_INT8_TOL), (QuantScheme(bits=8, group_size=-1, sym=True), CPU_INT8_TOL),
    (QuantScheme(bits=8, group_size=0, outliers=0.01), CPU_INT8_TOL),
])  # fmt: skip
@pytest.mark.parametrize("M", [1, 3, 16])
def test_cpu_backend_matches_reference(scheme, tol, M):
    g = torch.Generator().manual_seed(M)
    W, x = torch.randn(96, 288, generator=g), torch.randn(2, M, 288, generator=g)  # 288: not a multiple of 64/128
    qw = rtn(W, scheme)
    cpu = QuantLinear(qw, torch.randn(96, generator=g), backend="cpu")
    ref = QuantLinear(qw, cpu.bias.data, backend="reference")
    assert cpu.backend == "cpu"
    assert rel(cpu(x), ref(x)) < tol


def test_cpu_backend_applies_act_order_permutation():
    from llmq.algorithms.gptq import gptq
    from llmq.config import GPTQConfig

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    W = torch.randn(64, 256, generator=g)
    qw = gptq(W, 2 * X.T @ X / 512, QuantScheme(bits=4, group_size=64), GPTQConfig(static_groups=False))
    assert qw.perm is not None
    x = torch.randn(5, 256, generator=g)
    assert rel(QuantLinear(qw, backend="cpu")(x), QuantLinear(qw, backend="reference")(x)) < CPU_INT4_TOL


def test_memory_footprint_counts_packed_and_repacked(qdir):
    d = qdir("--bits", "4")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    expect = sum(t.numel() * t.element_size() for t in m.state_dict().values() if t.layout == torch.strided)
    expect -= m.lm_head.weight.numel() * 4 if m.config.tie_word_embeddings else 0
    repacked = sum(b.numel() * b.element_size() for n, b in m.named_buffers() if "repacked_" in n)
    assert m.get_memory_footprint() == pytest.approx(expect + repacked, rel=0.02)


def test_device_map_auto_with_offload_runs(qdir, tmp_path):
    d = qdir("--bits", "4", "--group-size", "32")
    ref = llmq.load_quantized(d, backend="reference")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map="auto", max_memory={"cpu": "150KB"},
                                             offload_folder=str(tmp_path / "offload"))  # fmt: skip
    placed = set(m.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed, m.hf_device_map  # really split between memory and disk
    assert rel(logits(m), logits(ref)) < CPU_INT4_TOL  # layers kept in memory may use the cpu backend
    assert m.generate(torch.randint(0, 256, (1, 6)), max_new_tokens=3, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("kw", [{"method": "rtn"}, {"method": "nf4"}, {"method": "nf4", "double_quant": True},
                                {"format": "q4_0"}])  # fmt: skip
def test_on_the_fly_refuses_non_finite_weights(tiny_dir, kw):
    """A NaN/Inf source weight is refused naming the tensor (it quantized to NaN or garbage before)."""
    from safetensors.torch import load_file, save_file

    d = tiny_dir("llama")
    f = d / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(LlmqError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN/Inf"):
        AutoModelForCausalLM.from_pretrained(d, quantization_config=llmq.LlmqConfig(**kw))
