"""llama.cpp's block formats and the GGUF export: every block type decodes in gguf-py exactly as llmq decodes it, GPTQ
on those grids beats round-to-nearest, llama.cpp's mixes and fallbacks give each tensor llama-quantize's type, and
the exported file carries what llama.cpp needs (or the export refuses, leaving no file)."""
import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny, make_tokenizer

import llmq
from llmq.algorithms.gptq import gptq
from llmq.algorithms.rtn import rtn
from llmq.cli import main
from llmq.config import GPTQConfig, QuantScheme, scheme_from_name
from llmq.errors import LlmqError
from llmq.formats import ggml
from llmq.gguf_names import rotary_permute
from llmq.recipes import Tensor, fitted, mix_type, output_type

TYPES = tuple(ggml.TYPES)
# K-quants need rows of 256: a tiny Llama whose every linear holds them (head_dim 64, 4 heads, 2 KV heads)
KSHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def hard_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different scales, heavy tails, an all-zero stretch, all-positive and all-negative groups."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    W[:, :cols // 8] *= torch.rand(rows, cols // 8, generator=g) ** 4 * 20
    W[0, :64] = 0
    W[1] = W[1].abs()
    W[2] = -W[2].abs()
    return W


@pytest.mark.parametrize("name", TYPES)
def test_gguf_py_decodes_llmq_blocks_bit_for_bit(name):
    bt = ggml.TYPES[name]
    W = hard_weight(12, 512)
    qw = rtn(W, QuantScheme(format=name))
    raw = qw.parts["qweight"]
    assert raw.shape == (12, 512 // bt.block * bt.type_size)
    ref = gguf.quants.dequantize(raw.numpy(), bt.qtype)
    assert np.array_equal(ref, qw.dequantize().numpy())
    assert qw.bits_per_weight() == 8 * bt.type_size / bt.block


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_round_trip(name):
    bt = ggml.TYPES[name]
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, bt.maxq + 1, (5, 512), generator=g).to(torch.uint8)
    W = hard_weight(5, 512, seed=2)
    S, O = bt.find_params(W.reshape(5, -1, bt.group), None, None)
    S, O, side = bt.store(S, O)
    raw = bt.pack(codes, side)
    c2, S2, O2 = bt.unpack(raw)
    assert torch.equal(c2, codes) and torch.equal(S2, S)
    assert (O is None and O2 is None) or torch.equal(O2, O)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_llmq_reads_gguf_py_blocks(name):
    """Blocks written by gguf-py's own quantizer unpack to what gguf-py decodes (the byte layout is llama.cpp's)."""
    bt = ggml.TYPES[name]
    W = hard_weight(6, 256, seed=3).numpy()
    raw = gguf.quants.quantize(W, bt.qtype)
    assert np.array_equal(bt.dequantize(torch.from_numpy(raw)).numpy(), gguf.quants.dequantize(raw, bt.qtype))


def test_rtn_at_least_as_good_as_gguf_py_quantizer():
    W = hard_weight(16, 512, seed=4)
    for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        bt = ggml.TYPES[name]
        ours = (rtn(W, QuantScheme(format=name)).dequantize() - W).square().sum()
        theirs = (torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), bt.qtype), bt.qtype))
                  - W).square().sum()  # fmt: skip
        assert ours <= theirs * 1.02, name


def layer_problem(R=64, C=512, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, C, generator=g) @ (torch.randn(C, C, generator=g) / C**0.5 + torch.eye(C))
    X[:, :8] *= 30  # a few large input channels, as in real LMs
    W = torch.randn(R, C, generator=g) * 0.05
    return W, X, 2 * X.t() @ X / n


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_gptq_on_block_grids_beats_rtn_and_stays_exact(name):
    W, X, H = layer_problem()
    s = QuantScheme(format=name)
    q_g = gptq(W, H, s, GPTQConfig())
    q_r = rtn(W, s)
    err = lambda q: ((X @ (q.dequantize() - W).t()) ** 2).mean()  # noqa: E731
    assert err(q_g) < 0.9 * err(q_r), name
    raw = q_g.parts["qweight"]
    assert np.array_equal(gguf.quants.dequantize(raw.numpy(), s.block.qtype), q_g.dequantize().numpy())


def test_scheme_names_and_refusals():
    s = scheme_from_name("q4_k")
    assert (s.format, s.bits, s.group_size, s.describe()) == ("q4_k", 4, 32, "q4_k")
    assert scheme_from_name("q6_k-clip").describe() == "q6_k-clip"
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(LlmqError, match="groups are 32 columns"):
        QuantScheme(format="q4_k", group_size=64)
    with pytest.raises(LlmqError, match="double_quant does not apply"):
        QuantScheme(format="q4_0", double_quant=True)
    with pytest.raises(LlmqError, match="outliers"):
        QuantScheme(format="q8_0", outliers=0.01)
    with pytest.raises(LlmqError, match="needs in_features divisible by 256"):
        rtn(torch.randn(4, 576), QuantScheme(format="q4_k"))


def test_fallbacks_are_llama_cpps():
    cases = {("q4_k", 576): "q5_0", ("q5_k", 576): "q5_1", ("q6_k", 576): "q8_0", ("q3_k", 576): "q4_0",
             ("q2_k", 576): "q4_0", ("q4_k", 1536): "q4_k", ("q4_0", 576): "q4_0"}  # fmt: skip
    for (f, cols), want in cases.items():
        assert fitted(QuantScheme(format=f, clip_search=True), cols).format == want
        assert fitted(QuantScheme(format=f, clip_search=True), cols).clip_search
    with pytest.raises(LlmqError, match="no multiple of 32"):
        fitted(QuantScheme(format="q4_k"), 100, "x.weight")


def test_mix_rules_on_smollm2_shapes():
    """llama.cpp's choices for a 30-layer model (SmolLM2: 9 heads, 3 KV heads), as llama-quantize makes them."""
    more = [i for i in range(30) if mix_type("Q4_K_M", Tensor("attn_v", i, 576), 30) == "q6_k"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert mix_type("Q4_K_M", Tensor("ffn_down", 3, 1536), 30) == "q4_k"
    assert mix_type("Q4_K_M", Tensor("attn_q", 0, 576), 30) == "q4_k"
    assert [mix_type("Q3_K_M", Tensor("attn_v", i, 576), 30) for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert mix_type("Q3_K_M", Tensor("ffn_down", 0, 1536), 30) == "q5_k"
    assert mix_type("Q3_K_M", Tensor("ffn_down", 2, 1536), 30) == "q4_k"
    assert mix_type("Q3_K_M", Tensor("attn_output", 7, 576), 30) == "q4_k"
    assert mix_type("Q3_K_M", Tensor("ffn_up", 7, 576), 30) == "q3_k"
    assert mix_type("Q4_0", Tensor("ffn_down", 2, 1536), 30, calibrated=True) == "q4_1"
    assert mix_type("Q4_0", Tensor("ffn_down", 2, 1536), 30, calibrated=False) == "q4_0"
    assert output_type("Q4_K_M", 576) == "q8_0" and output_type("Q4_K_M", 4096) == "q6_k"
    assert output_type("Q4_0", 4096) == "q6_k" and output_type("Q8_0", 4096) == "q8_0"
    with pytest.raises(LlmqError, match="not known"):
        mix_type("Q4_K_X", Tensor("attn_q", 0, 576), 30)


@pytest.fixture
def ksrc(tmp_path):
    def make(model_type="llama", **over):
        d = tmp_path / f"src-{model_type}"
        make_tiny(model_type, vocab=300, **(KSHAPES | over)).save_pretrained(d)
        make_tokenizer(300).save_pretrained(d)
        return d

    return make


def quantize(src, out, *args):
    assert main(["quantize", str(src), str(out), "--quiet", *map(str, args)]) == 0
    return out


def read(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def expected_rows(name: str, W: torch.Tensor, heads=4, kv=2, permute=True) -> torch.Tensor:
    if permute and ".q_proj" in name:
        return rotary_permute(W, heads)
    if permute and ".k_proj" in name:
        return rotary_permute(W, kv)
    return W


@pytest.mark.parametrize("model_type, recipe", [("llama", "Q4_K_M"), ("llama", "Q3_K_M"), ("qwen2", "Q4_0")])
def test_export_equals_llmq_and_carries_llama_cpp_metadata(ksrc, tmp_path, model_type, recipe):
    src = ksrc(model_type)
    q = quantize(src, tmp_path / "q", "--gguf-recipe", recipe)
    dest = tmp_path / "model.gguf"
    assert main(["export", str(q), str(dest), "--to", "gguf", "--quiet"]) == 0
    r, tensors = read(dest)
    arch = {"llama": "llama", "qwen2": "qwen2"}[model_type]
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    assert f["general.architecture"] == arch and f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.embedding_length"] == 256 and f[f"{arch}.feed_forward_length"] == 512
    assert f[f"{arch}.attention.head_count"] == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and len(r.fields["tokenizer.ggml.tokens"].contents()) == 300
    assert len(f["tokenizer.ggml.merges"]) > 0 and "tokenizer.ggml.eos_token_id" in f
    assert f["tokenizer.ggml.pre"] == "default" and f["tokenizer.ggml.add_bos_token"] is False  # as the tokenizer
    model = llmq.load_quantized(q, backend="reference")
    n_linear = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "scheme"):
            continue
        layer, rest = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest]  # fmt: skip
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type.name.lower() == mod.scheme.format
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mod.out_features, -1)
        want = expected_rows(name, mod.quantized_weight().dequantize(torch.float32), permute=arch == "llama")
        assert np.array_equal(got, want.numpy()), name
        n_linear += 1
    assert n_linear == 14
    assert tensors["token_embd.weight"].tensor_type.name in ("Q4_K", "Q4_0", "Q3_K")  # untied: the mix's type
    assert tensors["output.weight"].tensor_type.name == "Q6_K"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    if model_type == "qwen2":
        assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    assert not list(tmp_path.glob(".*llmq-export-tmp"))


# each family's own metadata as convert_hf_to_gguf.py writes it (llmq/gguf_names.py), on its tiny model
FAMILY_KEYS = {
    "qwen3": {"qwen3.attention.key_length": 16},
    "gemma2": {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
               "gemma2.attention.sliding_window": 4096, "gemma2.attention.sliding_window_pattern": [True, False]},
    "gemma3_text": {"gemma3.attention.sliding_window": 8, "gemma3.attention.sliding_window_pattern": [True, False],
                    "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4},
    "phi3": {"phi3.attention.sliding_window": 0, "phi3.rope.dimension_count": 64},
    "olmo2": {"olmo2.attention.layer_norm_rms_epsilon": 1e-5},
    "granite": {"granite.embedding_scale": 12.0, "granite.residual_scale": 0.22, "granite.logit_scale": 8.0,
                "granite.attention.scale": 0.0625},
    "smollm3": {"smollm3.rope.freq_base": 2e6},
}  # fmt: skip


@pytest.mark.parametrize("model_type", list(FAMILY_KEYS))
def test_family_exports_equal_llmq_with_the_converters_metadata(ksrc, tmp_path, model_type):
    """Every family in gguf_names.FAMILIES: its linears' blocks decode in gguf-py to llmq's dequantization (q/k rows
    permuted where llama.cpp wants them), norms as llama.cpp computes them (Gemma: 1 + w), the family's own keys."""
    from llmq.gguf_names import FAMILIES

    fam = FAMILIES[model_type]
    src = ksrc(model_type)
    q = quantize(src, tmp_path / "q", "--gguf-recipe", "Q4_K_M")
    s = llmq.export(q, tmp_path / "m.gguf", "gguf")
    assert s["exact_modules"] == s["modules"] > 0 and s["max_weight_diff"] == 0.0
    r, tensors = read(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == fam.arch and f[f"{fam.arch}.block_count"] == 2
    for k, v in FAMILY_KEYS[model_type].items():
        assert f[k] == pytest.approx(v), k
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], 2)
    model = llmq.load_quantized(q, backend="reference")
    sd = model.state_dict()
    n_linear = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "scheme"):
            t = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mod.out_features, -1)
            want = expected_rows(name, mod.quantized_weight().dequantize(torch.float32), permute=fam.permute)
            assert np.array_equal(got, want.numpy()), name
            n_linear += 1
    assert n_linear == s["modules"]
    norms = [k for k in sd if k.endswith("norm.weight")]
    assert norms
    for k in norms:
        got = np.asarray(tensors[names.get_name(k, try_suffixes=(".weight",))].data)
        assert np.array_equal(got, (sd[k].float() + fam.norm_shift).numpy()), k


def test_families_llama_cpp_cannot_run_as_written_are_refused(ksrc, tmp_path, capsys):
    """Refused before a byte is written, with the reason: a query scale llama.cpp does not compute, MLA."""
    q = quantize(ksrc("gemma3_text", query_pre_attn_scalar=256), tmp_path / "q", "--format", "q4_0")
    assert main(["export", str(q), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "query_pre_attn_scalar 256 differs from head_dim 16" in capsys.readouterr().err
    ds = quantize(ksrc("deepseek_v3", kv_lora_rank=32), tmp_path / "ds", "--format", "q8_0")
    assert main(["export", str(ds), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "attn_k_b (transposed)" in capsys.readouterr().err and not list(tmp_path.glob("*.gguf"))


def test_fallback_types_and_tied_embeddings(tiny_dir, tmp_path):
    """Rows of 64 hold no 256-column K-quant: llama.cpp's fallback types; tied embeddings get the output's type."""
    src = tiny_dir("llama", tokenizer=True, tie_word_embeddings=True)
    q = quantize(src, tmp_path / "q", "--gguf-recipe", "Q4_K_M")
    dest = tmp_path / "m.gguf"
    s = llmq.export(q, dest, "gguf")
    assert set(s["types"]) == {"Q5_0", "Q8_0", "F32"} and s["exact_modules"] == s["modules"] == 14
    _, tensors = read(dest)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert s["tensors"]["blk.1.attn_v.weight"] == "Q8_0"  # q6_k -> q8_0
    assert s["tensors"]["blk.0.ffn_down.weight"] == "Q5_0"  # q4_k -> q5_0 (160 columns hold no 256-block)


def test_int4_sym_g32_exports_as_q4_0_exactly(ksrc, tmp_path):
    q = quantize(ksrc(), tmp_path / "q", "--bits", 4, "--sym", "--group-size", 32)
    dest = tmp_path / "m.gguf"
    s = llmq.export(q, dest, "gguf", gguf_embedding_type="f16")
    assert s["exact_modules"] == 14 and s["max_weight_diff"] == 0.0
    _, tensors = read(dest)
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"


def test_block_checkpoint_runs_in_llmq(ksrc, tmp_path):
    """A q4_k checkpoint loads (reference backend) and computes the fake-quantized model's logits."""
    src = ksrc()
    q = quantize(src, tmp_path / "q", "--format", "q4_k")
    model = llmq.load_quantized(q)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = make_tiny("llama", vocab=300, **KSHAPES)
    llmq.fake_quantize(ref, llmq.quantize(ref, QuantScheme(format="q4_k")))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=2e-3, atol=2e-3)


def test_bad_gguf_exports_leave_nothing(ksrc, tiny_dir, tmp_path, capsys):
    src = ksrc()
    q_int = quantize(src, tmp_path / "q_int", "--bits", 4, "--group-size", 128)
    dest = tmp_path / "m.gguf"
    assert main(["export", str(q_int), str(dest), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "int4-asym-g128, which no llama.cpp block holds exactly" in err and "--gguf-recipe" in err
    assert not dest.exists() and not list(tmp_path.glob(".*tmp"))
    assert main(["export", str(src), str(dest), "--to", "gguf"]) == 2  # not an llmq checkpoint
    assert not dest.exists()
    q = quantize(src, tmp_path / "q", "--format", "q4_0")
    assert main(["export", str(q), str(tmp_path), "--to", "gguf"]) == 2
    assert "is a directory" in capsys.readouterr().err
    dest.write_bytes(b"x")
    assert main(["export", str(q), str(dest), "--to", "gguf"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and dest.read_bytes() == b"x"
    assert main(["export", str(q), str(dest), "--to", "gguf", "--overwrite", "--quiet"]) == 0
    gpt2 = quantize(tiny_dir("gpt2", tokenizer=True), tmp_path / "g", "--format", "q4_0")
    assert main(["export", str(gpt2), str(tmp_path / "g.gguf"), "--to", "gguf"]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err and not (tmp_path / "g.gguf").exists()
    assert main(["quantize", str(src), str(tmp_path / "x"), "--gguf-recipe", "Q4_K_M", "--format", "nf4"]) == 2
    assert "leave out --format" in capsys.readouterr().err


def test_on_the_fly_block_format_with_fallback(tiny_dir):
    """from_pretrained(fp, LlmqConfig(format="q4_k")): rows of 64 fall back to q5_0 as llama.cpp would."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=llmq.LlmqConfig(format="q4_k"))
    kinds = {mod.scheme.format for mod in m.modules() if hasattr(mod, "scheme")}
    assert kinds == {"q5_0"}


def test_mixed_precision_over_block_formats(ksrc, tmp_path):
    from conftest import SAMPLE_TEXT

    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    q = quantize(ksrc(), tmp_path / "q", "--target-bpw", "5.2", "--candidates", "q3_k,q4_k,q6_k", "--calib-split",
                 "test", "--nsamples", 4, "--seqlen", 32, "--calib", str(tmp_path / "calib.txt"))
    s = llmq.export(q, tmp_path / "m.gguf", "gguf")
    lin = [t for n, t in s["tensors"].items() if n.startswith("blk.")]
    assert set(lin) <= {"Q3_K", "Q4_K", "Q6_K", "F32"} and len(set(lin) - {"F32"}) >= 2
    assert s["linear_bits_per_weight"] <= 5.2 and s["exact_modules"] == s["modules"]
