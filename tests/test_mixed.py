"""Mixed precision: the allocator (exact on synthetic tables), the sensitivity statistics, and the CLI end to end."""
import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import incomplete, make_tiny, make_tokenizer, quantize_killed_after

import llmq
from llmq.allocate import allocate
from llmq.cli import main
from llmq.config import DEFAULT_CANDIDATES, QuantScheme, scheme_from_name
from llmq.errors import LlmqError
from llmq.sensitivity import damage, layer_stats


def brute_force(damage_t, nbytes, budget):
    names = list(damage_t)
    best = None
    for combo in itertools.product(*(list(damage_t[n]) for n in names)):
        cost = sum(nbytes[n][s] for n, s in zip(names, combo))
        d = sum(damage_t[n][s] for n, s in zip(names, combo))
        if cost <= budget and (best is None or d < best[0] - 1e-12):
            best = (d, cost)
    return best


def synthetic(n_layers=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    schemes = {"b2": 2, "b3": 3, "b4": 4, "b8": 8}
    weights = {f"l{i}": int(torch.randint(1, 5, (1,), generator=g)) * 64 for i in range(n_layers)}
    sens = {n: float(torch.rand(1, generator=g)) * 10 ** float(torch.randint(0, 3, (1,), generator=g)) for n in weights}
    dmg = {n: {s: sens[n] * 4.0 ** (-b) for s, b in schemes.items()} for n in weights}
    nbytes = {n: {s: weights[n] * b // 8 + 2 * (weights[n] // 64) for s, b in schemes.items()} for n in weights}
    return dmg, nbytes, weights


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [2.5, 3.0, 3.6, 4.5, 6.0])
def test_allocator_is_exact_and_within_budget(seed, target):
    dmg, nbytes, weights = synthetic(seed=seed)
    a = allocate(dmg, nbytes, weights, target)
    budget = int(target * sum(weights.values()) / 8)
    assert a.exact and a.used_bytes <= budget and a.budget_bytes == budget
    best = brute_force(dmg, nbytes, budget)
    assert a.damage == pytest.approx(best[0], rel=1e-12)
    assert a.bits_per_weight == pytest.approx(8 * a.used_bytes / sum(weights.values()))


def test_allocator_coarse_mode_stays_within_budget_and_near_optimal():
    dmg, nbytes, weights = synthetic(n_layers=8, seed=3)
    budget = int(3.3 * sum(weights.values()) / 8)
    a = allocate(dmg, nbytes, weights, 3.3, max_cells=40)  # forces rounded-up costs
    assert not a.exact and a.used_bytes <= budget
    assert a.damage <= brute_force(dmg, nbytes, budget)[0] * 1.5


def test_allocator_prefers_sensitive_layers():
    w = {"a": 4096, "b": 4096}
    nbytes = {n: {"int2": 1024, "int4": 2048} for n in w}
    dmg = {"a": {"int2": 10.0, "int4": 1.0}, "b": {"int2": 1.0, "int4": 0.1}}
    a = allocate(dmg, nbytes, w, 3.0)  # room for one int4
    assert a.choice == {"a": "int4", "b": "int2"}
    assert a.bits_per_weight == 3.0


def test_budget_below_smallest_scheme_is_a_clear_error():
    dmg, nbytes, weights = synthetic()
    with pytest.raises(LlmqError, match="below the smallest candidate mix"):
        allocate(dmg, nbytes, weights, 1.5)


def test_scheme_names_round_trip():
    for n in DEFAULT_CANDIDATES + ("nf4-g64-dq", "nf3-g32", "int4-sym-pc-clip", "int8-pt"):
        s = scheme_from_name(n)
        assert scheme_from_name(s.describe()) == s
    assert scheme_from_name("int3-g64-dq") == QuantScheme(bits=3, group_size=64, double_quant=True)
    assert scheme_from_name("nf3-g128-dq") == QuantScheme(bits=3, format="nf3", group_size=128, double_quant=True)
    assert scheme_from_name("nf2-g64-dq") == QuantScheme(bits=2, format="nf2", group_size=64, double_quant=True)
    with pytest.raises(LlmqError, match="not understood"):
        scheme_from_name("nf5-g64")
    with pytest.raises(LlmqError, match="not understood"):
        scheme_from_name("int5-g64")
    with pytest.raises(LlmqError, match="'q9'"):
        scheme_from_name("int4-q9")


def test_layer_stats_match_autograd():
    """A = mean x xᵀ and G = mean (∂ loss/∂y)² of one linear (empirical Fisher: the data's next tokens), against
    a direct autograd computation."""
    model = make_tiny("llama").float()
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = layer_stats(model, calib, fisher="empirical")
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    xs, ys = [], []

    def keep(module, inputs, output):
        xs.append(inputs[0])
        output.retain_grad()
        ys.append(output)

    h = lin.register_forward_hook(keep)
    A = G = 0
    for row in calib:
        xs.clear(), ys.clear()
        logits = model(row.unsqueeze(0)).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum").backward()
        x = xs[0].reshape(-1, xs[0].shape[-1]).detach()
        A = A + x.t() @ x
        G = G + ys[0].grad.reshape(-1, ys[0].shape[-1]).square().sum(0)
    h.remove()
    model.zero_grad()
    n = calib.numel()
    torch.testing.assert_close(stats[name].A, A / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats[name].G, G / n, rtol=1e-4, atol=1e-10)
    assert len(stats) == 2 * 7
    # the estimate is a quadratic form: zero for no change, exactly 4x for twice the change
    W = lin.weight.detach()
    D = torch.randn_like(W) * 1e-2
    assert damage(W, W, stats[name]) == 0
    assert damage(W, W + 2 * D, stats[name]) == pytest.approx(4 * damage(W, W + D, stats[name]), rel=1e-5)


def test_true_fisher_is_the_expected_squared_gradient():
    """fisher="true" draws next tokens from the model: averaged over many draws, G must converge to the exact
    expectation E_y[(∂ℓ/∂o)²] = Σ_t Σ_v p_t(v) (∂ℓ_t(v)/∂o)² (the draws of different positions are
    independent and E_y[∂ℓ_t/∂z_t] = 0, so the cross terms vanish), computed here label by label; and it must
    differ from the empirical Fisher of the same window."""
    torch.manual_seed(0)
    model = make_tiny("llama", vocab=48).float()
    row = torch.randint(0, 48, (6,), generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.self_attn.v_proj"
    lin = model.get_submodule(name)
    outs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outs.append(output)

    h = lin.register_forward_hook(keep)
    exact = 0
    logits = model(row.unsqueeze(0)).logits[0, :-1].detach()
    p = torch.softmax(logits, -1)
    for t in range(len(row) - 1):
        for v in range(48):
            outs.clear()
            z = model(row.unsqueeze(0)).logits[0, t]
            torch.nn.functional.cross_entropy(z[None], torch.tensor([v])).backward()
            exact = exact + p[t, v] * outs[0].grad[0].square().sum(0)
    h.remove()
    model.zero_grad()
    exact = exact / len(row)  # G is a mean over the window's positions
    draws = layer_stats(model, row.repeat(400, 1), fisher="true")[name].G
    emp = layer_stats(model, row.unsqueeze(0), fisher="empirical")[name].G
    rel = lambda a: float((a - exact).norm() / exact.norm())  # noqa: E731
    assert rel(draws) < 0.1, rel(draws)  # Monte Carlo error of 400 draws per position: ~5%
    assert rel(emp) > 3 * rel(draws)
    with pytest.raises(LlmqError, match="fisher='fishy'"):
        layer_stats(model, row.unsqueeze(0), fisher="fishy")


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    make_tiny("llama", vocab=300, num_hidden_layers=3).save_pretrained(d)
    make_tokenizer(300).save_pretrained(d)
    return d


CANDS = "int2-g32,int3-g32,int4-g32,int8-g32"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_target_bpw_meets_budget_and_loads(src, sample_text, tmp_path, method, capsys):
    out = tmp_path / "mixed"
    args = ["quantize", str(src), str(out), "--method", method, "--target-bpw", "3.5", "--candidates", CANDS,
            "--calib", str(sample_text), "--nsamples", "4", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mixed"] and info["bits_per_weight"] <= 3.5
    assert info["bits_per_weight"] > 3.4  # the budget is used, not left idle
    used = {m["scheme"] for m in info["modules"]}
    assert len(used) >= 2
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["allocation"]["bits_per_weight"] == pytest.approx(info["bits_per_weight"], abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"]["mixed"]["bits_per_weight"] == pytest.approx(info["bits_per_weight"], abs=1e-4)
    assert main(["inspect", str(out)]) == 0
    assert "allocation" in capsys.readouterr().out
    png = tmp_path / "alloc.png"
    assert main(["inspect", str(out), "--plot-allocation", str(png)]) == 0 and png.stat().st_size > 10_000
    # loads through both paths with per-module schemes, and they agree
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = llmq.load_quantized(out, backend="reference")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    auto = hf(ids).logits  # cpu backend (bf16 activations) on the int4/int8 layers, reference elsewhere
    ref_logits = ref(ids).logits
    assert ((auto - ref_logits).norm() / ref_logits.norm()) < 1e-2
    llmq.set_backend(hf, "reference")
    assert torch.equal(hf(ids).logits, ref_logits)
    assert hf.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


def test_cli_target_bpw_bad_input(src, sample_text, tmp_path, capsys):
    base = ["quantize", str(src), str(tmp_path / "o"), "--quiet", "--calib", str(sample_text), "--nsamples", "4",
            "--seqlen", "32", "--candidates", CANDS]  # fmt: skip
    assert main(base + ["--target-bpw", "2.0"]) == 2
    assert "below the smallest candidate mix" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(base) == 2  # --candidates without --target-bpw
    assert "only used with --target-bpw" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--target-bpw", "3", "--candidates", "int4-g128,int9"])
    assert "not understood" in capsys.readouterr().err


def test_resume_reuses_the_allocation(src, sample_text, tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "llmq", "quantize", str(src), str(out), "--quiet", "--target-bpw", "3.2",
           "--candidates", CANDS, "--calib", str(sample_text), "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    r = quantize_killed_after(0, *cmd[4:])
    assert r.returncode != 0 and (out / "sensitivity.json").is_file() and incomplete(out)
    before = (out / "sensitivity.json").read_text()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert json.loads((out / "sensitivity.json").read_text())["allocation"] == json.loads(before)["allocation"]


# ---- per output row (--granularity row) ----------------------------------------------------------------------
ROW_SCHEMES = {s: scheme_from_name(s) for s in ("int2-g32", "int4-g32", "int8-g32")}


def row_table(seed=0, shapes=((48, 64), (32, 128), (80, 64))):
    """Row damages: each row has its own sensitivity, damage falls 4x per bit."""
    g = torch.Generator().manual_seed(seed)
    names = {f"l{i}": s for i, s in enumerate(shapes)}
    dmg = {}
    for n, (R, C) in names.items():
        sens = torch.rand(R, generator=g).double() * 10 ** torch.randint(0, 3, (R,), generator=g).double()
        dmg[n] = {s: (sens * 4.0 ** (-sc.bits)).numpy() for s, sc in ROW_SCHEMES.items()}
    return dmg, names


@pytest.mark.parametrize("target", [2.8, 3.5, 5.0, 8.4])
def test_row_allocator_meets_budget_and_beats_per_linear(target):
    from llmq.allocate import allocate_rows, piece_bytes

    dmg, shapes = row_table()
    a = allocate_rows(dmg, shapes, ROW_SCHEMES, target)
    total = sum(R * C for R, C in shapes.values())
    assert a.used_bytes <= a.budget_bytes == int(target * total / 8)
    # the bytes are exact: the pieces' layouts for their row counts plus one index byte per row of a split linear
    used = 0
    for n, (R, C) in shapes.items():
        counts = torch.bincount(torch.tensor(a.part[n]), minlength=len(a.names[n])).tolist()
        used += sum(piece_bytes(c, C, ROW_SCHEMES[s]) for s, c in zip(a.names[n], counts))
        used += R if len(counts) > 1 else 0
    assert used == a.used_bytes and a.bits_per_weight == pytest.approx(8 * used / total)
    assert a.bits_per_weight > target - 0.15  # the budget is spent, not left idle
    # choosing per row can only do better than per linear at the same budget (here: strictly)
    per_lin = allocate({n: {s: float(d.sum()) for s, d in ds.items()} for n, ds in dmg.items()},
                       {n: {s: piece_bytes(R, C, sc) for s, sc in ROW_SCHEMES.items()} for n, (R, C) in shapes.items()},
                       {n: R * C for n, (R, C) in shapes.items()}, target)  # fmt: skip
    assert a.damage < per_lin.damage


def test_row_allocator_prefers_sensitive_rows_and_rejects_small_budgets():
    from llmq.allocate import allocate_rows

    R, C = 64, 64
    sens = torch.ones(R, dtype=torch.float64)
    sens[:8] = 1000.0  # 8 very sensitive rows
    dmg = {"l": {s: (sens * 4.0 ** (-sc.bits)).numpy() for s, sc in ROW_SCHEMES.items()}}
    a = allocate_rows(dmg, {"l": (R, C)}, ROW_SCHEMES, 3.3)  # int2 everywhere: 2.71, + 1 index byte per row
    bits = [ROW_SCHEMES[a.names["l"][k]].bits for k in a.part["l"]]
    assert min(bits[:8]) > max(bits[8:])
    with pytest.raises(LlmqError, match="below the smallest candidate mix"):
        allocate_rows(dmg, {"l": (R, C)}, ROW_SCHEMES, 2.0)
    with pytest.raises(LlmqError, match="outliers are not supported"):
        allocate_rows({"l": {"o": dmg["l"]["int4-g32"]}}, {"l": (R, C)}, {"o": scheme_from_name("int4-g32-out0.01")}, 5)


def test_row_split_weight_is_its_pieces_and_runs():
    from llmq.algorithms.rtn import rtn
    from llmq.config import RowSplit
    from llmq.nn import RowSplitLinear
    from llmq.qtensor import RowSplitWeight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 96, generator=g)
    part = tuple(int(x) for x in torch.randint(0, 3, (40,), generator=g))
    split = RowSplit(tuple(ROW_SCHEMES.values()), part)
    qw = RowSplitWeight.quantize(W, split, rtn)
    Wd = qw.dequantize()
    for k, s in enumerate(split.schemes):
        rows = torch.tensor(split.rows(k))
        assert torch.equal(Wd[rows], rtn(W[rows], s).dequantize())
    assert qw.nbytes() == 40 + sum(q.nbytes() for q in qw.pieces)
    from llmq import codec
    from llmq.record import ModuleRecord

    rec = ModuleRecord.of("m", qw)
    assert rec.nbytes() == qw.nbytes() and set(codec.encode("m", qw)) == set(codec.layout(rec))
    back = codec.decode(rec, codec.encode("m", qw))
    assert torch.equal(back.dequantize(), Wd)
    x = torch.randn(3, 96, generator=g)
    bias = torch.randn(40, generator=g)
    lin = RowSplitLinear(qw, bias, backend="reference")
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, Wd, bias), atol=1e-5)
    with pytest.raises(LlmqError, match="must use every one"):
        RowSplit(tuple(ROW_SCHEMES.values()), (0, 2, 2))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_granularity_row(src, sample_text, tmp_path, method, capsys):
    out = tmp_path / "rows"
    args = ["quantize", str(src), str(out), "--method", method, "--target-bpw", "3.5", "--granularity", "row",
            "--candidates", "int2-g32,int4-g32,int8-g32", "--calib", str(sample_text), "--nsamples", "4",
            "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mixed"] and 3.3 < info["bits_per_weight"] <= 3.5
    assert any(m["scheme"].startswith("rows: ") for m in info["modules"])
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["allocation"]["bits_per_weight"] == pytest.approx(info["bits_per_weight"], abs=1e-4)
    assert (out / "sensitivity_rows.safetensors").is_file()
    assert main(["inspect", str(out)]) == 0
    assert "2b" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    from llmq.nn import RowSplitLinear

    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = llmq.load_quantized(out, backend="reference")
    assert any(isinstance(m, RowSplitLinear) for m in ref.modules())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    llmq.set_backend(hf, "reference")
    assert torch.equal(hf(ids).logits, ref(ids).logits)
    llmq.set_backend(hf, "auto")
    auto, ref_logits = hf(ids).logits, ref(ids).logits
    assert ((auto - ref_logits).norm() / ref_logits.norm()) < 1e-2
    assert main(["quantize", str(src), str(tmp_path / "x"), "--granularity", "row", "--quiet"]) == 2
    assert "only used with --target-bpw" in capsys.readouterr().err


def test_resume_with_row_granularity(src, sample_text, tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "llmq", "quantize", str(src), str(out), "--quiet", "--target-bpw", "3.2",
           "--granularity", "row", "--candidates", "int2-g32,int4-g32,int8-g32", "--calib", str(sample_text),
           "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    r = quantize_killed_after(0, *cmd[4:])
    assert r.returncode != 0 and (out / "sensitivity_rows.safetensors").is_file()
    before = json.loads((out / "sensitivity.json").read_text())["allocation"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "sensitivity.json").read_text())["allocation"] == before
    whole = tmp_path / "whole"
    assert subprocess.run([*cmd[:5], str(whole), *cmd[6:]], capture_output=True).returncode == 0
    a, b = llmq.load_quantized(out, backend="reference"), llmq.load_quantized(whole, backend="reference")
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a(ids).logits, b(ids).logits)
