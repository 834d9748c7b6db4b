"""Checkpoints written before a change load bit-identically: the v1 fixtures in tests/data/ were written by commit
9a40314 (tests/data/make_v1_fixture.py says how) and are never rewritten."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmq

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = ["v1_llama", "v1_gpt2"]


def sha(W: torch.Tensor) -> str:
    return hashlib.sha256(W.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def load(name: str, how: str):
    d = DATA / name
    if how == "load_quantized":
        return llmq.load_quantized(d, backend="reference")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return llmq.set_backend(m, "reference")


@pytest.mark.parametrize("how", ["load_quantized", "from_pretrained"])
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_dequantizes_bit_identically(name, how):
    expected = json.loads((DATA / f"{name}.expected.json").read_text())["dequantized_sha256"]
    model = load(name, how)
    got = {m: sha(model.get_submodule(m).quantized_weight().dequantize(torch.float32)) for m in expected}
    assert got == expected
    ref = load_file(DATA / f"{name}.expected.safetensors")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    # the reference backend's float order may change (it is a matmul); the weights above may not
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_fixture_covers_every_stored_part():
    """The llama fixture holds every kind of stored tensor a v1 checkpoint can have (else it proves less)."""
    qc = json.loads((DATA / "v1_llama" / "config.json").read_text())["quantization_config"]
    keys = set(json.loads((DATA / "v1_llama" / "model.safetensors.index.json").read_text())["weight_map"])
    suffixes = {k.rsplit(".", 1)[1] for k in keys}
    assert {"qweight", "scales", "scales_q", "scales_step", "scales_off", "qzeros", "outlier_crow", "outlier_col",
            "outlier_val", "perm", "row_part"} <= suffixes  # fmt: skip
    formats = {s["format"] for s in qc["overrides"].values()} | {qc["scheme"]["format"]}
    assert formats == {"int", "nf4", "nf3", "nf2"}
    assert {s["scale_dtype"] for s in qc["overrides"].values()} == {"float16", "bfloat16", "float32"}
    assert {s["group_size"] for s in qc["overrides"].values()} >= {-1, 0, 16, 48}
    assert qc["row_splits"] and qc["permuted_modules"] and qc["outlier_nnz"]
