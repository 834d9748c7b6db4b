"""Rotations fused into the weights: Hadamard constructions, logits of the rotated full-precision model equal the
original's, unsupported architectures refused, and a rotated conversion streams, resumes, loads and exports."""
import json
import signal

import pytest
import torch
from conftest import incomplete, make_tiny, make_tokenizer, quantize_killed_after
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmq
from llmq.cli import main
from llmq.errors import LlmqError
from llmq.rotation import Rotation, RotationConfig, hadamard, orthogonal, rotate_model

# fp32 logits of a 2-layer model before and after a float64 rotation rounded once to fp32
LOGIT_ATOL = 2e-5


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 48, 60, 64, 576, 896, 1536])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert H.shape == (n, n) and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 18])
def test_no_hadamard_order_is_refused_with_the_way_out(n):
    with pytest.raises(LlmqError, match="--rotate random"):
        hadamard(n)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_seeded(kind):
    Q = orthogonal(kind, 48, torch.Generator().manual_seed(3))
    assert torch.allclose(Q @ Q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, orthogonal(kind, 48, torch.Generator().manual_seed(3)))
    assert not torch.equal(Q, orthogonal(kind, 48, torch.Generator().manual_seed(4)))
    if kind == "hadamard":  # maximally incoherent: every entry ±1/√n
        assert torch.allclose(Q.abs(), torch.full_like(Q, 48**-0.5))


def tiny_with_norms(model_type: str, seed: int = 0, **over):
    """A tiny model whose norm weights (and attention biases, where the architecture has them) are not trivial:
    random-init norms are all ones, which would let a missing fold pass."""
    model = make_tiny(model_type, seed=seed, **over)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def ids(seed=0, vocab=256):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotated_model_has_the_same_logits(model_type, kind, tied):
    """hidden 48 (a Paley order: 48 = 4 · 12), 4 heads of 12, grouped-query attention (2 kv heads)."""
    model = tiny_with_norms(model_type, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=tied)  # fmt: skip
    with torch.no_grad():
        want = model(ids()).logits
        rot = rotate_model(model, kind, seed=1)
        got = model(ids()).logits
    assert (got - want).abs().max() < LOGIT_ATOL * want.abs().max()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied
    assert not model.config.tie_word_embeddings
    model.tie_weights()  # transformers must not tie them back
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(48)) and torch.equal(model.model.norm.weight,
                                                                                     torch.ones(48))  # fmt: skip
    # the rotation did something: no weight is left as it was
    assert not torch.allclose(layer.self_attn.q_proj.weight, tiny_with_norms(
        model_type, hidden_size=48, num_attention_heads=4, num_key_value_heads=2).model.layers[0].self_attn.q_proj.weight)
    assert rot.record() == {"kind": kind, "seed": 1}


def test_rotation_spreads_an_outlier_channel():
    """The point of it: a residual channel 100x the others is spread over all of them."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 100
    E = model.model.embed_tokens.weight.clone()
    rotate_model(model, "hadamard")
    E2 = model.model.embed_tokens.weight
    ratio = lambda x: (x.abs().amax(0) / x.abs().mean(0)).max()  # noqa: E731
    assert (E.abs().amax() / E.abs().median()) > 5 * (E2.abs().amax() / E2.abs().median())
    assert ratio(E2) < ratio(E)


@pytest.mark.parametrize("model_type, why", [("olmo2", "norm after a writer"), ("gemma3_text", r"1 \+ w"),
                                             ("phi3", "not yet for this family")])
def test_families_without_an_exact_rotation_are_refused_with_the_reason(model_type, why):
    with pytest.raises(LlmqError, match=why):
        rotate_model(make_tiny(model_type), "hadamard")


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_layernorm_models_are_refused_with_the_reason(model_type, tiny_dir, tmp_path, capsys):
    with pytest.raises(LlmqError, match="LayerNorm subtracts the mean"):
        rotate_model(make_tiny(model_type), "hadamard")
    src = tiny_dir(model_type)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--quiet", "--rotate", "hadamard"]) == 2
    assert "--rotate none" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # refused before anything was written


def test_bad_kind_is_refused():
    with pytest.raises(LlmqError, match="hadamard, random"):
        RotationConfig("spin")


@pytest.fixture
def src(tmp_path):
    """A tied 4-layer tiny Llama with non-trivial norms, in safetensors shards (streamed), with a tokenizer."""
    d = tmp_path / "src"
    tiny_with_norms("llama", vocab=300, num_hidden_layers=4, tie_word_embeddings=True).save_pretrained(
        d, max_shard_size="60KB")  # fmt: skip
    make_tokenizer(300).save_pretrained(d)
    return d


def quantize(src, out, *args):
    assert main(["quantize", str(src), str(out), "--quiet", *map(str, args)]) == 0
    return out


def test_streamed_conversion_equals_the_in_memory_rotation(src, tmp_path):
    """`llmq quantize --rotate` rotates each layer as it is read: the same codes as rotating the resident model and
    quantizing it; the checkpoint loads through from_pretrained, untied, and stays close to the original model."""
    q = quantize(src, tmp_path / "q", "--bits", 8, "--group-size", 32, "--rotate", "hadamard")
    summary = json.loads((q / "summary.json").read_text())
    assert summary["method"]["rotation"] == {"kind": "hadamard", "seed": 0, "untied_head": True}
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["quantization_config"]["method"]["rotation"]["kind"] == "hadamard"
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        want = model(ids(vocab=300)).logits
    rotate_model(model, "hadamard")
    ref = llmq.quantize(model, llmq.QuantScheme(bits=8, group_size=32))
    loaded = llmq.load_quantized(q, backend="reference")
    for name, qw in ref.items():
        assert torch.equal(loaded.get_submodule(name).quantized_weight().codes(), qw.codes()), name
    hf = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    tensors = {k: v for f in q.glob("model*.safetensors") for k, v in load_file(f).items()}
    assert "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    with torch.no_grad():
        got = hf(ids(vocab=300)).logits
    assert ((got - want).norm() / want.norm()) < 0.02  # int8 g32 and fp16 embeddings: close to the original


def test_gptq_with_rotation_resumes_after_kill_identically(src, tmp_path, sample_text):
    args = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--rotate", "hadamard", "--calib",
            sample_text, "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    a, b = tmp_path / "interrupted", tmp_path / "straight"
    r = quantize_killed_after(1, src, a, "--quiet", *args)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert incomplete(a)
    assert main(["quantize", str(src), str(a), "--quiet", *map(str, args)]) == 0
    quantize(src, b, *args)
    ta = {k: v for f in sorted(a.glob("model*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("model*.safetensors")) for k, v in load_file(f).items()}
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # a resume with another rotation is a different request: refused
    assert quantize_killed_after(0, src, tmp_path / "c", "--quiet", *args).returncode == -signal.SIGKILL
    other = [x if x != "hadamard" else "random" for x in args]
    assert main(["quantize", str(src), str(tmp_path / "c"), "--quiet", *map(str, other)]) == 2


def test_rotated_checkpoint_exports_to_every_format(src, tmp_path):
    """A rotated checkpoint is a plain Llama: compressed-tensors, GPTQ and GGUF take it, each equal to llmq's own
    dequantization (the exporters' summaries), with the untied head written."""
    q = quantize(src, tmp_path / "q", "--bits", 4, "--sym", "--group-size", 32, "--rotate", "hadamard")
    for to, dest in (("compressed-tensors", tmp_path / "ct"), ("gptq", tmp_path / "g"), ("gguf", tmp_path / "m.gguf")):
        s = llmq.export(q, dest, to)
        assert s["exact_modules"] == s["modules"] == 28 and s["max_weight_diff"] == 0.0, to
    import gguf

    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" in names and "token_embd.weight" in names
    from transformers import CompressedTensorsConfig

    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()  # fmt: skip
    ours = llmq.load_quantized(q, dtype=torch.float32, backend="reference").eval()
    with torch.no_grad():
        a, b = ct(ids(vocab=300)).logits, ours(ids(vocab=300)).logits
    assert ((a - b).norm() / b.norm()) < 1e-3


def test_mixed_precision_and_nf_on_a_rotated_model(src, tmp_path, sample_text):
    q = quantize(src, tmp_path / "m", "--target-bpw", 4.5, "--rotate", "random", "--calib", sample_text,
                 "--nsamples", 4, "--seqlen", 32)  # fmt: skip
    assert json.loads((q / "summary.json").read_text())["method"]["rotation"]["kind"] == "random"
    q2 = quantize(src, tmp_path / "n", "--format", "nf4", "--group-size", 32, "--rotate", "hadamard")
    m = llmq.load_quantized(q2, backend="reference").eval()
    with torch.no_grad():
        assert torch.isfinite(m(ids(vocab=300)).logits).all()


def test_rotation_object_for_unsupported_model_raises_early():
    cfg = make_tiny("gpt2").config
    with pytest.raises(LlmqError, match="cannot be rotated"):
        Rotation(RotationConfig("hadamard"), cfg)
