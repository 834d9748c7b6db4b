"""llmq export: compressed-tensors loaded by transformers + compressed-tensors, GPTQ read back by a reader written
from the GPTQ layout (not the writer's inverse), and every refusal with its message, leaving nothing at DEST."""
import json

import pytest
import torch
from conftest import make_tiny, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import llmq
from llmq.cli import main

# ragged shapes: hidden 80 and MLP 176 are no multiple of 32, so 3-bit rows end inside an int32 word; k/v have 16 rows
SHAPES = dict(hidden_size=80, intermediate_size=176, num_attention_heads=5, num_key_value_heads=1)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    make_tiny("llama", vocab=300, **SHAPES).save_pretrained(d)
    make_tokenizer(300).save_pretrained(d)
    return d


def quantize(src, out, *args):
    assert main(["quantize", str(src), str(out), "--quiet", *map(str, args)]) == 0
    return out


def export(q, dest, *args):
    return main(["export", str(q), str(dest), "--quiet", *map(str, args)])


def x_ids(seed=0):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def llmq_weights(q, dtype) -> dict[str, torch.Tensor]:
    m = llmq.load_quantized(q, backend="reference")
    return {n: mod.quantized_weight().dequantize(dtype) for n, mod in m.named_modules() if hasattr(mod, "scheme")}


def dense_model(src, weights: dict[str, torch.Tensor], dtype):
    """The source model holding `weights` in its linears and fp16-rounded other tensors (what the export stores)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(dtype))
        for n, W in weights.items():
            model.get_submodule(n).weight.copy_(W.to(dtype))
    return model


CT_SCHEMES = {
    "int4-sym-g16": ["--bits", 4, "--sym", "--group-size", 16],
    "int4-asym-g16": ["--bits", 4, "--group-size", 16],
    "int3-asym-g16": ["--bits", 3, "--group-size", 16],
    "int8-sym-pc": ["--bits", 8, "--sym", "--group-size", -1],
    "int4-asym-g16-dq": ["--bits", 4, "--group-size", 16, "--double-quant"],
}


@pytest.mark.parametrize("name", list(CT_SCHEMES))
def test_compressed_tensors_dequantized_by_transformers_equals_llmq(src, tmp_path, name):
    from transformers import CompressedTensorsConfig

    q = quantize(src, tmp_path / "q", *CT_SCHEMES[name])
    dtype = "float32" if name.endswith("-dq") else "float16"  # fp32 scales hold double-quantized ones exactly
    assert export(q, tmp_path / "ct", "--to", "compressed-tensors", "--dtype", dtype) == 0
    summary = json.loads((tmp_path / "ct" / "llmq_export.json").read_text())
    assert summary["max_weight_diff"] == 0.0 and summary["exact_modules"] == summary["modules"] == 14
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()  # fmt: skip
    ours = llmq_weights(q, getattr(torch, dtype))
    for n, W in ours.items():
        assert torch.equal(ct.get_submodule(n).weight.to(W.dtype), W), n  # compressed-tensors' own dequantization
    dense = dense_model(src, ours, torch.float32)
    with torch.no_grad():
        assert torch.equal(ct(x_ids()).logits, dense(x_ids()).logits)


def test_compressed_tensors_default_path_runs_symmetric(src, tmp_path):
    q = quantize(src, tmp_path / "q", *CT_SCHEMES["int4-sym-g16"])
    assert export(q, tmp_path / "ct", "--to", "compressed-tensors") == 0
    # compressed modules: the fp16 scales load into the model's fp32 parameters and each weight is decompressed
    # in fp32, i.e. exactly llmq's fp32 dequantization
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    dense = dense_model(src, llmq_weights(q, torch.float32), torch.float32)
    with torch.no_grad():
        assert torch.equal(ct(x_ids()).logits, dense(x_ids()).logits)


def test_mixed_precision_becomes_config_groups(src, tmp_path, sample_text):
    """Each scheme becomes a config group targeting its modules by exact name. compressed-tensors' own compressor,
    given the scheme it assigns each module, dequantizes to llmq's weights, and the default (compressed) path of
    transformers computes the dense model's logits. (transformers' dequantize=True path decompresses every dense
    module with one group's scheme, get_dense_scheme, so it cannot load mixed precision.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    q = quantize(src, tmp_path / "q", "--target-bpw", 5.0, "--candidates", "int4-g16,int8-pc,int3-g16", "--sym",
                 "--calib", sample_text, "--nsamples", 4, "--seqlen", 32)  # fmt: skip
    assert export(q, tmp_path / "ct", "--to", "compressed-tensors") == 0
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert len(groups) == 3 and qc["ignore"] == ["lm_head"]
    targets = [t for g in groups.values() for t in g["targets"]]
    assert len(targets) == 14 and all(t.startswith("re:^model[.]layers") for t in targets)
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "ct"))
    apply_quantization_config(skeleton, QuantizationConfig.model_validate(qc))
    stored = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        stored |= load_file(f)
    ours = llmq_weights(q, torch.float16)
    for n, W in ours.items():
        scheme = skeleton.get_submodule(n).quantization_scheme
        parts = {k: stored[f"{n}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], W), n
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    dense = dense_model(src, llmq_weights(q, torch.float32), torch.float32)
    with torch.no_grad():
        assert torch.equal(ct(x_ids()).logits, dense(x_ids()).logits)


# ---- GPTQ, read by a reader written from the layout ----------------------------------------------
def read_gptq(d, name: str, bits: int, v1: bool) -> torch.Tensor:
    """W [R, C] of module `name` from a GPTQ checkpoint, bit by bit as the layout says: qweight int32 [C/P, R] holds
    code k of output n at bits (k % P)·b of word (k // P, n); qzeros int32 [G, R/P] zero (g, n) at bits (n % P)·b of
    word (g, n // P), stored minus one in v1; scales fp16 [G, R]; g_idx [C]; W = scales[g]·(q − zero[g])."""
    t = {}
    for f in d.glob("*.safetensors"):
        t |= load_file(f)
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    P, mask = 32 // bits, (1 << bits) - 1
    C, R = qweight.shape[0] * P, qweight.shape[1]
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(C)
    q = (words[k // P] >> ((k % P) * bits).unsqueeze(1)) & mask  # [C, R]
    zw = qzeros.to(torch.int64) & 0xFFFFFFFF
    n = torch.arange(R)
    z = (zw[:, n // P] >> ((n % P) * bits)) & mask  # [G, R]
    z = z + 1 if v1 else z
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t()


def test_gptq_v1_symmetric_read_back_exactly(src, tmp_path):
    q = quantize(src, tmp_path / "q", "--bits", 4, "--sym", "--group-size", 16)
    assert export(q, tmp_path / "g", "--to", "gptq") == 0
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["sym"] and not cfg["desc_act"]
    for n, W in llmq_weights(q, torch.float32).items():
        assert torch.equal(read_gptq(tmp_path / "g", n, 4, v1=True), W), n


def asymmetric_with_a_zero_of_zero(src, tmp_path):
    """A checkpoint where one group of one module is all positive, so its asymmetric zero point is 0."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :16] = model.model.layers[0].mlp.up_proj.weight[:, :16].abs()
    d = tmp_path / "src0"
    model.save_pretrained(d)
    return quantize(d, tmp_path / "q0", "--bits", 4, "--group-size", 16)


def test_gptq_asymmetric_zero_of_zero_v2_exact_and_v1_refused(src, tmp_path, capsys):
    q = asymmetric_with_a_zero_of_zero(src, tmp_path)
    assert export(q, tmp_path / "g2", "--to", "gptq", "--gptq-format", "v2") == 0
    assert json.loads((tmp_path / "g2" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    for n, W in llmq_weights(q, torch.float32).items():
        assert torch.equal(read_gptq(tmp_path / "g2", n, 4, v1=False), W), n
    capsys.readouterr()
    assert export(q, tmp_path / "g1", "--to", "gptq") == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj is asymmetric with a zero point of 0" in err and "--gptq-format v2" in err
    assert not (tmp_path / "g1").exists() and not list(tmp_path.glob(".g1*"))


# ---- refusals --------------------------------------------------------------------------------------
REFUSED = [
    ("compressed-tensors", ["--format", "nf4", "--group-size", 16], "uses the nf4 codebook", "--format int"),
    ("compressed-tensors", ["--bits", 4, "--group-size", 16, "--outliers", 0.01], "keeps outliers", "without --outliers"),
    ("compressed-tensors", ["--bits", 4, "--group-size", 0], "one scale per tensor", "--group-size -1"),
    ("compressed-tensors", ["--bits", 4, "--group-size", 48], "does not divide in_features 80", "divides it"),
    ("gptq", ["--bits", 3, "--sym", "--group-size", 16], "3-bit codes", "--bits 4 or 8"),
    ("gptq", ["--format", "fp4", "--group-size", 16], "uses the fp4 codebook", "--format int"),
]  # fmt: skip


@pytest.mark.parametrize("to, qargs, why, hint", REFUSED)
def test_unsupported_scheme_is_refused_naming_the_module(src, tmp_path, capsys, to, qargs, why, hint):
    q = quantize(src, tmp_path / "q", *qargs)
    capsys.readouterr()
    assert export(q, tmp_path / "out", "--to", to) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmq: error: ") and "\n" not in err and "model.layers.0.self_attn.q_proj" in err
    assert why in err and hint in err and "nothing was written" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_permutation_and_row_split_and_mixed_gptq_are_refused(src, tmp_path, sample_text, capsys):
    calib = ["--calib", sample_text, "--nsamples", 4, "--seqlen", 32]
    perm = quantize(src, tmp_path / "perm", "--method", "gptq", "--bits", 4, "--group-size", 16, "--no-static-groups",
                    *calib)  # fmt: skip
    rows = quantize(src, tmp_path / "rows", "--target-bpw", 6.0, "--granularity", "row", "--candidates",
                    "int4-g16,int8-pc", *calib)  # fmt: skip
    mixed = quantize(src, tmp_path / "mixed", "--target-bpw", 6.0, "--candidates", "int4-g16,int8-pc", *calib)
    for q, to, why in [(perm, "compressed-tensors", "act-order permutation"), (rows, "compressed-tensors", "split by "
                       "output row"), (mixed, "gptq", "several schemes (mixed precision)")]:  # fmt: skip
        capsys.readouterr()
        assert export(q, tmp_path / "out", "--to", to) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_bad_sources_and_destinations(src, tmp_path, capsys):
    q = quantize(src, tmp_path / "q", "--bits", 4, "--sym", "--group-size", 16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(tmp_path / "nope", tmp_path / "a", "no such directory"),
             (src, tmp_path / "b", "no llmq quantization_config"),
             (q, foreign, "not empty and not an llmq export"),
             (q, q, "another directory than its source")]  # fmt: skip
    for s, d, msg in cases:
        capsys.readouterr()
        assert export(s, d, "--to", "compressed-tensors") == 2
        assert msg in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    # interrupted (no config.json) and corrupted (a flipped byte) llmq dirs
    (broken := tmp_path / "broken").mkdir()
    for f in q.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert export(broken, tmp_path / "c", "--to", "gptq") == 2
    assert "checksum mismatch" in capsys.readouterr().err and not (tmp_path / "c").exists()
    (broken / "config.json").unlink()
    assert export(broken, tmp_path / "c", "--to", "gptq") == 2
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # an earlier export is replaced only with --overwrite
    assert export(q, tmp_path / "e", "--to", "gptq") == 0
    capsys.readouterr()
    assert export(q, tmp_path / "e", "--to", "compressed-tensors") == 2 and "--overwrite" in capsys.readouterr().err
    assert export(q, tmp_path / "e", "--to", "compressed-tensors", "--overwrite") == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "e")
    assert cfg.quantization_config["quant_method"] == "compressed-tensors" and cfg.architectures == ["LlamaForCausalLM"]
    assert (tmp_path / "e" / "README.md").read_text().count("vllm serve") == 1
