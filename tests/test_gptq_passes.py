"""GPTQ's passes over the calibration windows: shared Hessians, passes stopped before a group's linears, replayed
blocks. Whatever the shortcuts, every linear's H must be the one a plain recomputation gives, and the layer's outputs
those of the quantized layer run whole. And every layer's time is accounted for, phase by phase."""
import dataclasses
import json

import pytest
import torch
from conftest import make_tiny

from llmq import pipeline, timing
from llmq.archs import arch_for, decoder_layers
from llmq.cli import main
from llmq.config import GPTQConfig, QuantPlan, QuantScheme

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


def reference_hessians(layer, spec, inps, args, kwargs) -> tuple[dict, list]:
    """H = 2XᵀX/n of every linear and the layer's outputs, from plain whole passes (forward hooks, no stopping)."""
    sums, counts, hs = {}, {}, []
    for rel in spec.linears:
        def hook(m, i, o, rel=rel):
            x = i[0].reshape(-1, i[0].shape[-1]).double()
            sums[rel] = sums.get(rel, 0) + x.t() @ x
            counts[rel] = counts.get(rel, 0) + x.shape[0]

        hs.append(layer.get_submodule(rel).register_forward_hook(hook))
    with torch.no_grad():
        outs = [pipeline._run_layer(layer, x, args, kwargs, "cpu") for x in inps]
    for h in hs:
        h.remove()
    return {rel: 2 * sums[rel] / counts[rel] for rel in spec.linears}, outs


def run_layer0(arch: str, cfg: GPTQConfig, spec=None):
    """GPTQ of decoder layer 0 through the pipeline; returns (layer, spec, inputs, acts, the H each linear got)."""
    model = make_tiny(arch)
    spec = spec or arch_for(model.config)
    calib = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(0))
    acts = pipeline.start_activations(model, spec, calib)
    inps = [x.clone() for x in acts.inps]
    layer = decoder_layers(model, spec)[0]
    got = {}
    real = pipeline.solve.gptq

    def spy(W, H, scheme, c, name):
        got[name.split(".0.", 1)[1]] = H.double().clone()
        return real(W, H, scheme, c, name)

    pipeline.solve.gptq = spy
    ran = {r: 0 for r in spec.linears}  # forward calls of each linear
    counters = [layer.get_submodule(r).register_forward_hook(lambda m, i, o, r=r: ran.__setitem__(r, ran[r] + 1))
                for r in spec.linears]  # fmt: skip
    try:
        with timing.Phases() as ph:
            pipeline.gptq_layer(layer, 0, spec, QuantPlan(QuantScheme(bits=3, group_size=16)), cfg, acts)
    finally:
        pipeline.solve.gptq = real
        for h in counters:
            h.remove()
    ph.ran = ran
    return layer, spec, inps, acts, got, ph


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_gptq_sees_what_a_plain_recomputation_sees(arch):
    """Sequential groups: each linear's input depends only on the groups before it, so a whole pass of the finished
    (quantized) layer reproduces every linear's input; the pipeline's H and outputs must equal that pass's."""
    layer, spec, inps, acts, got, ph = run_layer0(arch, GPTQConfig())
    ref_H, ref_out = reference_hessians(layer, spec, inps, acts.args, acts.kwargs)
    assert set(got) == set(spec.linears)
    for rel in spec.linears:  # every window counted (the old stop rule fed up_proj one window only)
        assert torch.allclose(got[rel], ref_H[rel], rtol=1e-5, atol=1e-6 * ref_H[rel].abs().max()), rel
    for y, r in zip(acts.inps, ref_out):  # outputs of replayed blocks = the quantized layer run whole
        assert torch.allclose(y, r, rtol=1e-5, atol=1e-6), arch
    assert ph.counts["passes"] == len(spec.sequential) + 1
    # attention ran twice per window (the fp reference pass, the o_proj pass), then was replayed: not 5 times
    n = len(inps)
    assert ph.ran[spec.sequential[0][0]] == 2 * n, ph.ran
    if arch != "opt":  # OPT's fc1 is no block of its own: it runs in the last pass as well
        # MLP's first linear: the reference pass, the down_proj pass, and window 0 of its own pass (where gate/up's
        # shared input is found); never in the last pass (the MLP is replayed from down_proj's input)
        assert ph.ran[spec.sequential[2][0]] == 2 * n + (len(spec.sequential[2]) > 1), ph.ran


def test_one_H_per_distinct_input_and_passes_stop_before_the_group_runs():
    model = make_tiny("llama")
    spec = arch_for(model.config)
    calib = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(0))
    acts = pipeline.start_activations(model, spec, calib)
    layer = decoder_layers(model, spec)[0]
    ran = {r: 0 for r in spec.linears}
    counters = [layer.get_submodule(r).register_forward_hook(lambda m, i, o, r=r: ran.__setitem__(r, ran[r] + 1))
                for r in spec.linears]  # fmt: skip
    hooks = pipeline._HessianHooks({r: layer.get_submodule(r) for r in spec.sequential[0]})
    pipeline._pass(layer, acts, hooks)
    hooks.remove()
    for h in counters:
        h.remove()
    assert hooks.alias == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj"}
    assert hooks.H["self_attn.k_proj"] is None and hooks.count["self_attn.q_proj"] == 6 * 40  # one product, all windows
    # window 0 runs q and k (finding that k and v read q's input); the other windows stop before q
    assert ran == {r: int(r in ("self_attn.q_proj", "self_attn.k_proj")) for r in spec.linears}
    _, _, _, _, got, _ = run_layer0("llama", GPTQConfig())
    assert got["mlp.gate_proj"].equal(got["mlp.up_proj"])  # gate and up share theirs too


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_block_that_does_not_return_its_last_linears_output_is_recomputed(arch):
    """A wrong block table (the MLP does not return up_proj's output) is caught on the full pass: the block is then
    run, not replayed, and the results are the same as with the right table."""
    model = make_tiny(arch)
    spec = arch_for(model.config)
    wrong = dataclasses.replace(spec, blocks=tuple((b, spec.sequential[0][0]) for b, _ in spec.blocks))
    _, _, _, right_acts, right_H, _ = run_layer0(arch, GPTQConfig())
    _, _, _, wrong_acts, wrong_H, _ = run_layer0(arch, GPTQConfig(), wrong)
    for rel in right_H:
        assert torch.allclose(right_H[rel], wrong_H[rel], rtol=1e-6), rel
    for a, b in zip(right_acts.inps, wrong_acts.inps):
        assert torch.allclose(a, b, atol=1e-6)


def test_not_sequential_takes_every_H_from_the_unquantized_layer():
    model = make_tiny("llama")
    spec = arch_for(model.config)
    calib = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(0))
    acts = pipeline.start_activations(model, spec, calib)
    ref_H, _ = reference_hessians(decoder_layers(model, spec)[0], spec, acts.inps, acts.args, acts.kwargs)
    _, _, _, acts, got, ph = run_layer0("llama", GPTQConfig(sequential=False))
    for rel in spec.linears:
        assert torch.allclose(got[rel], ref_H[rel], rtol=1e-5, atol=1e-6 * ref_H[rel].abs().max()), rel
    assert ph.counts["passes"] == 2  # one for every H, one for the outputs
    assert dataclasses.asdict(GPTQConfig())["sequential"] is True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replay_gives_the_same_bits_as_recomputing(arch):
    _, spec, _, fast, got, ph = run_layer0(arch, GPTQConfig())
    _, _, _, slow, got_slow, ph_slow = run_layer0(arch, GPTQConfig(replay=False))
    for rel in spec.linears:
        assert torch.equal(got[rel], got_slow[rel]), rel
    for a, b in zip(fast.inps, slow.inps):
        assert torch.equal(a, b)
    assert sum(ph.ran.values()) < sum(ph_slow.ran.values())  # the point of it: fewer linears run


def test_resume_may_switch_replay_off(tiny_dir, sample_text, tmp_path):
    """Out of memory with replay: the same command with --no-gptq-replay resumes (replay changes no bit)."""
    from conftest import incomplete, quantize_killed_after

    src = tiny_dir("llama", tokenizer=True)
    out = tmp_path / "q"
    args = [str(src), str(out), "--method", "gptq", "--calib", str(sample_text), "--nsamples", "4", "--seqlen", "32"]
    assert quantize_killed_after(0, *args).returncode != 0 and incomplete(out)
    assert main(["quantize", *args, "--no-gptq-replay", "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert main(["quantize", *args[:1], str(ref), *args[2:], "--quiet"]) == 0
    for f in sorted(ref.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("C", [1, 5, 128, 300, 1100])
def test_the_upper_triangle_product_is_the_full_product(C):
    x = torch.randn(97, C, generator=torch.Generator().manual_seed(C))
    H = torch.zeros(C, C)
    pipeline.accumulate_xtx(H, x)
    pipeline.accumulate_xtx(H, 2 * x)
    ref = 5 * (x.double().t() @ x.double())
    assert torch.allclose(pipeline.symmetrize(H).double(), ref, rtol=1e-5, atol=1e-4)


def test_phases_add_up_to_each_layers_time(tiny_dir, sample_text, tmp_path):
    src = tiny_dir("llama", tokenizer=True, hidden_size=64, intermediate_size=256)
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--method", "gptq", "--calib", str(sample_text), "--nsamples", "16",
                 "--seqlen", "64", "--bits", "4", "--group-size", "32", "--clip-search", "--quiet"]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    for r in s["layers"]:
        ph = r["phases"]
        assert {"read", "forward", "hessian", "cholesky", "column_loop", "clip_search", "params", "error", "write"} <= set(ph)
        assert all(v >= 0 for v in ph.values())
        assert abs(sum(ph.values()) - r["seconds"]) <= 0.1 * r["seconds"], (ph, r["seconds"])
        assert r["passes"] == 5  # q/k/v, o, gate/up, down, and the outputs
    assert set(s["phases_s"]) == set(s["layers"][0]["phases"])
    assert s["phases_s"]["forward"] == pytest.approx(sum(r["phases"]["forward"] for r in s["layers"]), abs=0.02)


def test_rtn_layers_are_timed_too(tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir("llama")), str(out), "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    for r in json.loads((out / "summary.json").read_text())["layers"]:
        assert {"read", "params", "write"} <= set(r["phases"]) and r["passes"] == 0
        assert abs(sum(r["phases"].values()) - r["seconds"]) <= 0.1 * r["seconds"] + 0.005


def test_phase_times_nest_exclusively():
    with timing.Phases() as ph:
        with timing.phase("forward"):
            with timing.phase("hessian"):
                torch.randn(200, 200) @ torch.randn(200, 200)
            timing.count("passes")
    assert set(ph.report()) == {"forward", "hessian"} and ph.counts["passes"] == 1
    with timing.phase("forward"):  # no active Phases: nothing recorded, nothing fails
        pass
    assert ph.seconds["forward"] >= 0 and len(ph.seconds) == 2
