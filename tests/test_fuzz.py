"""Fuzzed checkpoints through both loaders (tests/fuzzing.py; benchmarks/fuzz.py runs thousands): every mutated
shard is refused with an LlmqError or loads tensors equal to the original's; never a crash, never other weights.
Value mutations with recomputed checksums: refused, or loaded with every value finite (a code moved within its grid
is a legal checkpoint); never a NaN or an Inf in the loaded model or its logits."""
from collections import Counter

import pytest
from conftest import make_tiny, make_tokenizer
from fuzzing import DATA_KINDS, HEADER_KINDS, load, outcome, state, value_checkpoints, value_variant, variant

from llmq.cli import main

N_HEADER, N_DATA = 180, 120  # 300 variants


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    w = tmp_path_factory.mktemp("fuzz")
    make_tiny("llama", vocab=300).save_pretrained(w / "src")
    make_tokenizer(300).save_pretrained(w / "src")
    q = w / "q"  # asymmetric int4 with outliers: qweight, scales, qzeros and the CSR tensors; several shards
    assert main(["quantize", str(w / "src"), str(q), "--quiet", "--bits", "4", "--group-size", "32", "--outliers",
                 "0.01", "--max-shard-size", "40KB"]) == 0  # fmt: skip
    return w, q


def test_fuzzed_shards_are_refused_or_equal(ckpt):
    w, q = ckpt
    refs = {loader: state(load(loader, q, True)) for loader in ("load_quantized", "from_pretrained")}
    counts, bad = Counter(), []
    for seed in range(N_HEADER + N_DATA):
        kinds = HEADER_KINDS if seed < N_HEADER else DATA_KINDS
        d, kind = variant(q, w / "work", seed, kinds)
        for loader, ref in refs.items():
            modes = (True, False) if kinds is HEADER_KINDS and loader == "from_pretrained" else (True,)
            for verify in modes:
                res, detail = outcome(loader, d, verify, ref)
                counts[(loader, verify, res)] += 1
                if res == "crash" or (res == "different" and verify):
                    bad.append((seed, kind, loader, verify, res, detail))
    print(dict(counts))
    assert bad == [], bad[:5]
    assert sum(v for (_, verify, res), v in counts.items() if verify and res == "error") > 250


def test_value_mutations_never_load_a_nan(ckpt):
    w, _ = ckpt
    srcs = value_checkpoints(w, w / "src")
    refs = {(src, loader): state(load(loader, src, True)) for src in srcs for loader in ("load_quantized", "from_pretrained")}
    counts, bad = Counter(), []
    for seed in range(160):
        src = srcs[seed % 2]
        d, kind, name = value_variant(src, w / "values", seed)
        for loader in ("load_quantized", "from_pretrained"):
            for verify in (True, False) if seed < 40 else (True,):
                res, detail = outcome(loader, d, verify, refs[(src, loader)])
                counts[(verify, res)] += 1
                if verify and res in ("crash", "nonfinite"):
                    bad.append((seed, kind, name, loader, res, detail))
    print(dict(counts))
    assert bad == [], bad[:5]
    assert counts[(True, "error")] > 60
    assert counts[(False, "nonfinite")] > 0  # without the checks the same mutations do load NaNs: the test can fail
