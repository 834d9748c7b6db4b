"""Learned rounding after GPTQ (llmq/algorithms/refine.py, llmq/pipeline/refine.py): the parametrisation gives back
GPTQ's weight exactly before training, codes stay on the scheme's grid, a refined layer's output error is below
GPTQ's and the stored checkpoint carries it, resume after kill -9 mid-refinement is byte-identical, the CLI records
it and refuses what does not apply."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SAMPLE_TEXT, incomplete, make_tokenizer, quantize_killed_after
from tiny import make_tiny

from llmq.algorithms.gptq import gptq
from llmq.algorithms.refine import ALPHA_MAX, ALPHA_MIN, Rounding
from llmq.cli import main
from llmq.config import GPTQConfig, QuantScheme, RowSplit
from llmq.errors import LlmqError
from llmq.pipeline import quantize
from llmq.qtensor import RowSplitWeight

SCHEMES = {
    "int3-asym": QuantScheme(bits=3, group_size=32),
    "int4-sym-dq": QuantScheme(bits=4, sym=True, group_size=32, double_quant=True),
    "int4-outliers": QuantScheme(bits=4, group_size=32, outliers=0.01),
    "nf4": QuantScheme(format="nf4", group_size=32),
    "fp4": QuantScheme(format="fp4", group_size=32),
    "q4_k": QuantScheme(format="q4_k"),
    "q4_0": QuantScheme(format="q4_0"),
}


def _problem(R: int = 48, C: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g)
    X = torch.randn(C, 512, generator=g) * torch.linspace(0.2, 3, C).unsqueeze(1)
    return W, X, 2 * X @ X.T / X.shape[1]


@pytest.mark.parametrize("static", [True, False], ids=["static-groups", "permuted"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_before_training_the_rounding_is_gptqs_weight_and_stores_gptqs_bytes(name, static):
    W, _, H = _problem()
    q = gptq(W, H, SCHEMES[name], GPTQConfig(static_groups=static))
    r = Rounding(W, q)
    assert torch.equal(r.weight().detach(), q.dequantize())
    done = r.finish()
    assert done.parts.keys() == q.parts.keys()
    assert all(torch.equal(done.parts[k], q.parts[k]) for k in q.parts)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_learned_offsets_move_codes_at_most_one_step_and_never_off_the_grid(name):
    W, _, H = _problem()
    scheme = SCHEMES[name]
    q = gptq(W, H, scheme, GPTQConfig())
    r = Rounding(W, q, clip=False)
    g = r.grids[0]
    with torch.no_grad():  # the extremes, and beyond (clamped to +-0.5)
        g.V.copy_(torch.randint(0, 2, g.V.shape).float() * 4 - 2)
    done = r.finish()
    done.validate("x")
    c0, c1 = q.codes().long(), done.codes().long()
    assert c1.max() <= (scheme.block.maxq if scheme.block else (1 << scheme.bits) - 1) and c1.min() >= 0
    if scheme.number_format.codebook is None:
        assert (c1 - c0).abs().max() <= 1  # one grid step from GPTQ's code, at most
    else:  # one step along the sorted codebook
        book = scheme.number_format.codebook
        srt = torch.sort(torch.unique(book)).values
        i0, i1 = (torch.bucketize(book[c], srt) for c in (c0, c1))
        assert (i1 - i0).abs().max() <= 1
    assert (c1 != c0).float().mean() > 0.2  # the offsets did move codes
    # what is stored is what training saw: the stored weight equals the fake-quantized one
    assert torch.equal(done.dequantize(), r.weight().detach())
    if "outlier_crow" in q.parts:  # exact weights untouched
        assert all(torch.equal(done.parts[k], q.parts[k]) for k in ("outlier_crow", "outlier_col", "outlier_val"))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_fused_fake_quant_gives_autograds_values_and_gradients(name):
    W, X, H = _problem()
    q = gptq(W, H, SCHEMES[name], GPTQConfig(static_groups=False))
    r = Rounding(W, q)
    g = r.grids[0]
    with torch.no_grad():  # inside and outside the clamps
        g.V.copy_(torch.rand(g.V.shape) * 1.4 - 0.7)
        if g.alpha is not None:
            g.alpha.copy_(torch.rand(g.alpha.shape) * 1.0 + 0.4)
    grads = []
    for f in (g.weight, g.weight_autograd):
        w = f()
        (w @ X - W @ X).square().mean().backward()
        grads.append((w.detach(), [p.grad.clone() for p in g.params()]))
        for p in g.params():
            p.grad = None
    (w1, g1), (w2, g2) = grads
    assert torch.equal(w1, w2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_clip_factors_restore_scales_in_the_schemes_dtype():
    W, _, H = _problem()
    for scheme in (QuantScheme(bits=3, group_size=32), QuantScheme(bits=4, sym=True, group_size=32, double_quant=True)):
        q = gptq(W, H, scheme, GPTQConfig())
        r = Rounding(W, q)
        with torch.no_grad():
            r.grids[0].alpha.copy_(torch.rand(r.grids[0].alpha.shape) * 2)  # clamped to [ALPHA_MIN, ALPHA_MAX]
        done = r.finish()
        done.validate("x")
        assert {k: v.dtype for k, v in done.parts.items()} == {k: v.dtype for k, v in q.parts.items()}
        ratio = done.scales() / q.scales()
        assert ratio.min() >= ALPHA_MIN - 1e-3 and ratio.max() <= ALPHA_MAX + 0.02  # stored scales round up
        assert (ratio - 1).abs().max() > 0.1
        if q.zeros() is not None:
            assert torch.equal(done.zeros(), q.zeros())  # zero points unchanged


def test_row_split_weights_refine_piece_by_piece():
    W, X, H = _problem()
    split = RowSplit((QuantScheme(bits=3, group_size=32), QuantScheme(bits=4, group_size=32)),
                     tuple(k % 2 for k in range(W.shape[0])))  # fmt: skip
    q = RowSplitWeight.quantize(W, split, lambda Wp, s: gptq(Wp, H, s, GPTQConfig()))
    r = Rounding(W, q)
    assert torch.equal(r.weight().detach(), q.dequantize())
    opt = torch.optim.Adam([g.alpha for g in r.grids], lr=0.003)  # the group scales: smooth in the loss
    for _ in range(30):
        loss = (r.weight() @ X - W @ X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    done = r.finish()
    assert isinstance(done, RowSplitWeight) and done.split == q.split
    err = lambda w: (w @ X - W @ X).square().mean().item()  # noqa: E731
    assert err(done.dequantize()) < err(q.dequantize())


# ---- a decoder layer, end to end ----------------------------------------------------------------------------------
def _output_error(fp_model, q: dict, calib) -> float:
    """Relative error of the final hidden states of fp_model with q's dequantized weights installed."""
    m = copy.deepcopy(fp_model)
    with torch.no_grad():
        for n, w in q.items():
            m.get_submodule(n).weight.copy_(w.dequantize())
        ref = fp_model.model(calib).last_hidden_state
        out = m.model(calib).last_hidden_state
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("scheme", [QuantScheme(bits=3, group_size=32), QuantScheme(format="nf4", group_size=32)],
                         ids=["int3", "nf4"])  # fmt: skip
def test_refined_layers_beat_gptq_and_the_stored_weights_carry_it(scheme):
    torch.manual_seed(0)
    fp = make_tiny("llama")
    calib = torch.randint(0, fp.config.vocab_size, (8, 128))
    reps_g, reps_r = [], []
    qg = quantize(copy.deepcopy(fp), scheme, calib, method="gptq", gptq=GPTQConfig(), reports=reps_g)
    qr = quantize(copy.deepcopy(fp), scheme, calib, method="gptq", gptq=GPTQConfig(refine=40), reports=reps_r)
    for g, r in zip(reps_g, reps_r):
        assert r.refine["kept"] and r.refine["loss_after"] < 0.9 * r.refine["loss_before"], r.refine
        assert r.rel_error < g.rel_error  # the pipeline's own error report, on the first windows
    assert reps_r[0].refine["loss_before"] == pytest.approx(reps_g[0].rel_error ** 2, rel=0.5)
    # the returned (stored) weights, not the training's: without the learned offsets this is GPTQ's error again
    e_g, e_r = _output_error(fp, qg, calib), _output_error(fp, qr, calib)
    assert e_r < 0.9 * e_g, (e_r, e_g)
    changed = sum(int((qr[n].codes() != qg[n].codes()).sum()) for n in qg if n.startswith("model.layers.0."))
    assert changed > 0


def test_refinement_that_does_not_help_is_dropped(monkeypatch):
    """A step that only hurts (the sign flipped): the layer keeps GPTQ's codes, and says so."""
    from llmq.pipeline import refine as refine_mod

    real = refine_mod._loss
    monkeypatch.setattr(refine_mod, "_loss", lambda y, t: -real(y, t) if torch.is_grad_enabled() else real(y, t))
    fp = make_tiny("llama")
    calib = torch.randint(0, fp.config.vocab_size, (4, 64))
    reps = []
    q = quantize(copy.deepcopy(fp), QuantScheme(bits=3, group_size=32), calib, method="gptq",
                 gptq=GPTQConfig(refine=10), reports=reps)  # fmt: skip
    qg = quantize(copy.deepcopy(fp), QuantScheme(bits=3, group_size=32), calib, method="gptq", gptq=GPTQConfig())
    assert not reps[0].refine["kept"] and reps[0].refine["loss_after"] > reps[0].refine["loss_before"]
    n = "model.layers.0.mlp.down_proj"
    assert torch.equal(q[n].parts["qweight"], qg[n].parts["qweight"])


@pytest.mark.parametrize("mt", ["qwen3", "gemma3_text"])
def test_other_families_refine(mt):
    """Masks and position embeddings cut to the refinement's prefix (Gemma 3: sliding-window masks)."""
    torch.manual_seed(0)
    fp = make_tiny(mt)
    calib = torch.randint(0, fp.config.vocab_size, (4, 96))
    reps = []
    quantize(copy.deepcopy(fp), QuantScheme(bits=3, group_size=32), calib, method="gptq",
             gptq=GPTQConfig(refine=20, refine_seqlen=48), reports=reps)  # fmt: skip
    assert all(r.refine["tokens"] == 4 * 48 and r.refine["loss_after"] < r.refine["loss_before"] for r in reps)


def test_loss_weighs_every_token_alike_whatever_its_norm():
    """A window's first token carries massive activations (10^4 x the others' norm in SmolLM2's middle layers): the
    loss is each token's relative error, averaged, so a 10% error on the other tokens is not drowned by it."""
    from llmq.pipeline.refine import _loss

    t = torch.randn(1, 64, 32)
    t[:, 0] *= 1e4
    y = t.clone()
    y[:, 1:] *= 1.1  # 10% off on every token but the first: relative squared error 0.01 on 63 of 64 tokens
    assert float(_loss(y, t)) == pytest.approx(0.01 * 63 / 64, rel=1e-4)


def test_prefix_cuts_sequence_dims_only():
    from llmq.pipeline.refine import prefix

    L, T = 64, 16
    args = {"mask": torch.zeros(1, 1, L, L), "pos": (torch.zeros(1, L, 64), torch.zeros(1, L, 64)),
            "ids": torch.zeros(1, L), "other": torch.zeros(3, 5), "flag": True}  # fmt: skip
    out = prefix(args, L, T)
    assert out["mask"].shape == (1, 1, T, T) and out["pos"][0].shape == (1, T, 64) and out["ids"].shape == (1, T)
    assert out["other"].shape == (3, 5) and out["flag"] is True
    assert prefix(args, L, L) is args


# ---- the CLI ------------------------------------------------------------------------------------------------------
ARGS = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--quiet"]


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "model"
    make_tiny("llama", vocab=300).save_pretrained(d)
    make_tokenizer(300).save_pretrained(d)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    return d


def test_cli_records_refinement_in_config_summary_and_phases(src, tmp_path):
    out = tmp_path / "out"
    main(["quantize", str(src), str(out), *ARGS, "--calib", str(tmp_path / "calib.txt"), "--refine", "15"])
    s = json.loads((out / "summary.json").read_text())
    assert s["method"]["gptq"]["refine"] == 15
    assert all(r["refine"]["steps"] == 15 and r["refine"]["loss_after"] <= r["refine"]["loss_before"]
               for r in s["layers"])  # fmt: skip
    assert s["phases_s"]["refine"] > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"]["gptq"]["refine"] == 15
    # a resume with other refinement settings is refused: the fingerprint holds them
    from llmq.cli import build_parser, quantize_request

    req = quantize_request(build_parser().parse_args(["quantize", str(src), str(out), *ARGS, "--refine", "16"]))
    assert req.fingerprint_args(src)["gptq"]["refine"] == 16


@pytest.mark.parametrize("flags,steps", [
    (["--method", "gptq", "--bits", "3"], 50), (["--method", "gptq", "--bits", "2", "--group-size", "64"], 50),
    (["--method", "gptq", "--format", "nf3"], 0), (["--method", "gptq", "--bits", "3", "--refine", "0"], 0),
    (["--method", "gptq", "--bits", "3", "--refine", "20"], 20), (["--method", "gptq", "--bits", "4"], 0),
    (["--method", "gptq", "--bits", "4", "--refine"], 50), (["--method", "gptq", "--format", "q3_k"], 0),
    (["--method", "gptq", "--bits", "3", "--target-bpw", "3.5"], 0), (["--bits", "3"], 0)])  # fmt: skip
def test_refinement_is_the_default_at_three_bits_and_below(flags, steps):
    """GPTQ on one integer grid of <= 3 bits refines unless told not to (config.refine_by_default); codebooks, 4 bits,
    llama.cpp's block formats and mixed precision only when asked (RTN: refused)."""
    from llmq.cli import build_parser, quantize_request

    req = quantize_request(build_parser().parse_args(["quantize", "m", "o", *flags]))
    assert (req.gptq.refine if req.gptq else 0) == steps


def test_cli_refuses_refine_without_gptq(src, tmp_path, capsys):
    assert main(["quantize", str(src), str(tmp_path / "o"), "--bits", "4", "--refine", "--quiet"]) == 2
    assert "--refine trains the rounding GPTQ chose: add --method gptq" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(LlmqError, match="refine=-1"):
        GPTQConfig(refine=-1)


def test_interrupted_mid_refinement_resumes_byte_identical(src, tmp_path):
    calib = ["--calib", str(tmp_path / "calib.txt")]
    flags = [*ARGS, *calib, "--refine", "12"]
    main(["quantize", str(src), str(tmp_path / "whole"), *flags])
    # killed at layer 1's 14th loss: its 8 windows scored before training, then the 6th of 12 training steps
    p = quantize_killed_after("1:refine:14", src, tmp_path / "cut", *flags)
    assert p.returncode == -9, p.stderr[-2000:]
    assert incomplete(tmp_path / "cut")
    prog = json.loads((tmp_path / "cut" / "llmq_progress.json").read_text())
    assert sorted(map(int, prog["layers"])) == [0]
    main(["quantize", str(src), str(tmp_path / "cut"), *flags])
    whole = sorted(p.name for p in (tmp_path / "whole").glob("model-*.safetensors"))
    assert whole and whole == sorted(p.name for p in (tmp_path / "cut").glob("model-*.safetensors"))
    for f in whole:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes()


def test_fp_target_carries_the_fp_models_activations_and_resumes_identically(src, tmp_path):
    """refine_target "fp": the targets are the fp model's own layer outputs, carried layer to layer (and through the
    finished layers' fp weights on resume)."""
    fp = make_tiny("llama")
    calib = torch.randint(0, fp.config.vocab_size, (4, 64))
    reps_q, reps_f = [], []
    scheme = QuantScheme(bits=3, group_size=32)
    quantize(copy.deepcopy(fp), scheme, calib, method="gptq", gptq=GPTQConfig(refine=10, refine_target="quantized"),
             reports=reps_q)  # fmt: skip
    quantize(copy.deepcopy(fp), scheme, calib, method="gptq", gptq=GPTQConfig(refine=10, refine_target="fp"),
             reports=reps_f)  # fmt: skip
    assert reps_q[0].refine["loss_before"] == reps_f[0].refine["loss_before"]  # layer 0: the same inputs
    assert reps_q[1].refine["loss_before"] != reps_f[1].refine["loss_before"]  # layer 1: other targets
    flags = [*ARGS, "--calib", str(tmp_path / "calib.txt"), "--refine", "8", "--refine-target", "fp"]
    main(["quantize", str(src), str(tmp_path / "whole"), *flags])
    p = quantize_killed_after(0, src, tmp_path / "cut", *flags)
    assert p.returncode == -9, p.stderr[-2000:]
    main(["quantize", str(src), str(tmp_path / "cut"), *flags])
    for f in sorted(p.name for p in (tmp_path / "whole").glob("model-*.safetensors")):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes()


def test_moe_experts_refine_each_its_own_rounding():
    from tiny import make_tiny_moe

    m = make_tiny_moe("qwen3_moe", vocab=300)
    calib = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    reps = []
    q = quantize(copy.deepcopy(m), QuantScheme(bits=3, group_size=32), calib, method="gptq",
                 gptq=GPTQConfig(refine=20), reports=reps)  # fmt: skip
    qg = quantize(copy.deepcopy(m), QuantScheme(bits=3, group_size=32), calib, method="gptq", gptq=GPTQConfig())
    assert all(r.refine["kept"] and r.refine["loss_after"] < r.refine["loss_before"] for r in reps)
    experts = [n for n in q if ".experts." in n]
    assert experts and sum(int((q[n].codes() != qg[n].codes()).any()) for n in experts) > len(experts) // 2


@pytest.mark.parametrize("to", ["compressed-tensors", "gptq", "gguf"])
def test_refined_checkpoints_export_exactly_as_unrefined_ones(tmp_path, to):
    """The exporters' own bit-exact checks, unchanged, on refined checkpoints (a K-quant mix for GGUF)."""
    import gguf
    import numpy as np
    from test_export import SHAPES, llmq_weights, read_gptq
    from test_gguf import KSHAPES

    d = tmp_path / "src"
    make_tiny("llama", vocab=300, **(KSHAPES if to == "gguf" else SHAPES)).save_pretrained(d)
    make_tokenizer(300).save_pretrained(d)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    cal = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--calib", str(tmp_path / "calib.txt"), "--quiet"]
    scheme = {"compressed-tensors": ["--bits", "4", "--group-size", "16"],
              "gptq": ["--bits", "4", "--sym", "--group-size", "16"], "gguf": ["--gguf-recipe", "Q4_K_M"]}[to]
    q, g = tmp_path / "q", tmp_path / "g"
    main(["quantize", str(d), str(g), *cal, *scheme])
    main(["quantize", str(d), str(q), *cal, *scheme, "--refine", "10"])
    refined, plain = llmq_weights(q, torch.float32), llmq_weights(g, torch.float32)
    assert any(not torch.equal(refined[n], plain[n]) for n in refined)  # the refinement changed weights
    dest = tmp_path / ("x.gguf" if to == "gguf" else "x")
    assert main(["export", str(q), str(dest), "--to", to, "--quiet"]) == 0
    if to == "compressed-tensors":
        s = json.loads((dest / "llmq_export.json").read_text())
        assert s["max_weight_diff"] == 0.0 and s["exact_modules"] == s["modules"] == 14
    elif to == "gptq":
        for n, W in refined.items():
            assert torch.equal(read_gptq(dest, n, 4, v1=True), W), n
    else:
        from test_gguf import expected_rows

        r = gguf.GGUFReader(dest)
        tensors = {t.name: t for t in r.tensors}
        names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
        for n, W in refined.items():
            t = tensors[f"blk.{n.split('.')[2]}.{names[n.split('.')[-1]]}.weight"]
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(W.shape[0], -1)
            assert np.array_equal(got, expected_rows(n, W).numpy()), n


def test_torchrun_two_processes_refine_on_their_own_windows(src, tmp_path):
    """Windows split over the ranks, gradients summed: every rank takes the same step, rank 0 writes; the loss is
    scored over both ranks' windows; the model is as good as one process's."""
    import math

    from test_distributed import torchrun
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmq

    flags = [*ARGS, "--calib", str(tmp_path / "calib.txt"), "--refine", "12"]
    main(["quantize", str(src), str(tmp_path / "one"), *flags])
    torchrun(2, src, tmp_path / "two", *flags)
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert [r["windows"] for r in two["distributed"]["ranks"]] == [4, 4]
    for a, b in zip(one["layers"], two["layers"]):
        assert b["refine"]["kept"] and b["refine"]["loss_after"] < b["refine"]["loss_before"]
        assert b["refine"]["tokens"] == a["refine"]["tokens"] == 8 * 64  # all ranks' windows
    assert two["layers"][0]["refine"]["loss_before"] == pytest.approx(one["layers"][0]["refine"]["loss_before"],
                                                                      rel=1e-3)  # fmt: skip
    ids = AutoTokenizer.from_pretrained(src)(SAMPLE_TEXT, return_tensors="pt").input_ids[:, : 4 * 64].view(4, 64)
    ppl = []
    for d in ("one", "two"):
        m = AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32)
        llmq.set_backend(m, "reference")
        with torch.no_grad():
            ppl.append(math.exp(m(ids, labels=ids).loss.item()))
    assert abs(ppl[1] / ppl[0] - 1) < 0.02, ppl
