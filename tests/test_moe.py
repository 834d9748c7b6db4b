"""Mixtures of experts (llmq/moe.py, llmq/pipeline/experts.py): experts as linears, each quantized on the tokens routed
to it; the loaded checkpoint computes what the dense model with the dequantized experts computes; the policy for
experts that get too few tokens; resume; torchrun; bad input refused before work."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, incomplete, make_tokenizer, quantize_killed_after
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import MOE, make_tiny_moe

import llmq
from llmq import moe
from llmq.algorithms.rtn import rtn
from llmq.archs import arch_for, describe, describe_lines
from llmq.cli import main
from llmq.config import QuantPlan, QuantScheme
from llmq.errors import LlmqError

FAMILIES = list(MOE)
ARGS = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--group-size", "32", "--quiet"]


def save_moe(root: Path, mt: str, **over) -> Path:
    d = root / mt
    make_tiny_moe(mt, vocab=300, **over).save_pretrained(d)
    make_tokenizer(300).save_pretrained(d)
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    return d


def quantize(src: Path, out: Path, *flags) -> dict:
    main(["quantize", str(src), str(out), *ARGS, "--calib", str(src.parent / "calib.txt"), *map(str, flags)])
    return json.loads((out / "summary.json").read_text())


def dequantized(lin) -> torch.Tensor:
    return lin.quantized_weight().dequantize(torch.float32) if hasattr(lin, "quantized_weight") else lin.weight.float()


def dense_of(q, config) -> torch.nn.Module:
    """The transformers model as it is built (fused 3-D experts) holding q's dequantized weights and q's own other
    tensors: what the loaded packed model must compute."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.quantization_config = None
    d = AutoModelForCausalLM.from_config(config).eval().float()
    mods = dict(q.named_modules())
    with torch.no_grad():
        for n, p in d.named_parameters():
            owner, _, attr = n.rpartition(".")
            m = mods.get(owner)
            if isinstance(m, moe.LinearExperts):
                per = [{f"{proj}.{w}": (dequantized(lin) if w == "weight" else lin.bias.float())
                        for proj in moe.PROJS for lin in [ex.get_submodule(proj)] for w in ("weight", "bias")
                        if w == "weight" or lin.bias is not None} for ex in m]  # fmt: skip
                p.copy_(m.fused(per)[attr])
            elif attr == "weight" and hasattr(m, "quantized_weight"):
                p.copy_(dequantized(m))
            else:
                p.copy_(q.get_parameter(n).float())
    return d


@pytest.mark.parametrize("mt", FAMILIES)
def test_experts_as_linears_compute_what_the_fused_module_computes(mt):
    m = make_tiny_moe(mt)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        names = moe.unfuse(m)
        got = m(ids).logits
    assert names and all(isinstance(m.get_submodule(n), moe.LinearExperts) for n in names)
    # same routing, same order of the weighted sum; gate and up as two products instead of one: fp32 rounding only
    assert torch.allclose(got, ref, rtol=0, atol=1e-5), (got - ref).abs().max()
    ex = m.get_submodule(names[-1])
    per = [{k: v for k, v in e.state_dict().items()} for e in ex]
    assert {k: v.shape for k, v in ex.fused(per).items()} == {
        k: v.shape for k, v in make_tiny_moe(mt).get_submodule(names[-1]).state_dict().items()}  # fmt: skip


def test_discovery_finds_expert_sets_routers_and_layer_kinds():
    spec = arch_for(make_tiny_moe("deepseek_v3").config)
    assert spec.layer_kind == (0, 1, 1)  # first_k_dense_replace = 1
    dense, sparse = spec.at(0), spec.at(1)
    assert dense.experts == () and "mlp.gate_proj" in dense.linears
    assert sparse.experts == ("mlp.experts",)
    assert sparse.sequential[-4:] == (
        tuple(f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")),
        tuple(f"mlp.experts.{e}.down_proj" for e in range(4)),
        ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), ("mlp.shared_experts.down_proj",))
    lines = "\n".join(describe_lines(describe(make_tiny_moe("deepseek_v3").config)))
    assert "layers 1-2" in lines and "mlp.experts.{0..3}.gate_proj 96x64" in lines
    assert "routers (mixture of experts)): mlp.gate" in lines
    gpt = arch_for(make_tiny_moe("gpt_oss").config)
    assert not any("router" in n for n in gpt.linears)


@pytest.mark.parametrize("mt", FAMILIES)
def test_gptq_checkpoint_loads_and_equals_the_dense_model_with_dequantized_experts(mt, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = save_moe(tmp_path, mt)
    s = quantize(src, tmp_path / "q")
    cfg = AutoConfig.from_pretrained(src)
    top_k = cfg.num_experts_per_tok
    for layer in s["layers"]:  # tokens routed per expert sum to top-k x calibration tokens
        for rep in layer["experts"].values():
            assert sum(rep["tokens"]) == top_k * 8 * 64 == top_k * rep["calibration_tokens"]
            assert rep["applied_to"] == [] and rep["policy"] == "layer"
    # two MoE layers in each (DeepSeek-V3: 3 layers, the first dense), each with its token counts
    assert sum(1 for layer in s["layers"] if layer["experts"]) == 2
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(q.get_submodule("model.layers.1.mlp.experts"), moe.LinearExperts)
    llmq.set_backend(q, "reference")
    dense = dense_of(q, cfg)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref = q(ids).logits, dense(ids).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-5), (got - ref).abs().max()
    # the experts were quantized (GPTQ moved them off the fp weights) and differ from each other
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe.unfuse(fp)
    for e in (0, 3):
        W = fp.get_submodule(f"model.layers.1.mlp.experts.{e}.down_proj").weight
        Wq = dequantized(q.get_submodule(f"model.layers.1.mlp.experts.{e}.down_proj"))
        assert 0.01 < ((Wq - W).norm() / W.norm()).item() < 0.2
    # the cpu backend (auto) serves the experts too, within its stated tolerance of the reference
    llmq.set_backend(q, "auto")
    with torch.no_grad():
        auto = q(ids).logits
    assert ((auto - got).norm() / got.norm()).item() < 2e-2


def test_gptq_beats_rtn_on_the_experts_outputs(tmp_path):
    """Each expert's GPTQ uses the H of its own routed tokens: its error on those tokens is below RTN's."""
    m = make_tiny_moe("qwen3_moe", vocab=300)
    fp = copy.deepcopy(m)
    moe.unfuse(fp)
    calib = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=3, group_size=32)
    reports = []
    qw = llmq.quantize(m, scheme, calib, method="gptq", reports=reports)
    ex_fp = fp.get_submodule("model.layers.0.mlp.experts")
    # layer 0's experts' inputs are those of the fp model (layer 0 sees the embeddings)
    seen = []
    h = ex_fp.register_forward_pre_hook(lambda mod, a: seen.append(a))
    with torch.no_grad():
        fp(calib)
    h.remove()
    hidden, index, _ = seen[0]
    for e in range(4):
        x = hidden[ex_fp.tokens_of(e, index)[1]]
        W = ex_fp[e].gate_proj.weight
        g = qw[f"model.layers.0.mlp.experts.{e}.gate_proj"].dequantize(torch.float32)
        r = rtn(W, scheme).dequantize(torch.float32)
        assert (x @ (g - W).t()).norm() < (x @ (r - W).t()).norm()
    assert sum(reports[0].experts["mlp.experts"]["tokens"]) == 2 * 8 * 64


def starve(model, expert: int) -> None:
    """gpt-oss's router has a bias: a very negative one (-100) for `expert` means no token is ever routed to it."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[expert] = -100.0


@pytest.mark.parametrize("policy", ["layer", "rtn", "all"])
def test_an_expert_without_tokens_gets_the_policy_and_is_named(policy):
    m = make_tiny_moe("gpt_oss", vocab=300)
    starve(m, 2)
    fp = copy.deepcopy(m)
    moe.unfuse(fp)
    calib = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=4, group_size=32)
    reports = []
    qw = llmq.quantize(m, scheme, calib, method="gptq", gptq=llmq.GPTQConfig(expert_policy=policy), reports=reports)
    for rep in reports:
        r = rep.experts["mlp.experts"]
        assert r["tokens"][2] == 0 and sum(r["tokens"]) == 2 * 8 * 64
        assert r["applied_to"] == ([2] if policy != "all" else [0, 1, 2, 3])
    name = "model.layers.0.mlp.experts.2.gate_proj"
    W = fp.get_submodule(name).weight
    is_rtn = torch.equal(qw[name].dequantize(torch.float32), rtn(W, scheme).dequantize(torch.float32))
    assert is_rtn == (policy == "rtn")
    for n, q in qw.items():
        assert torch.isfinite(q.dequantize(torch.float32)).all(), n


def test_starved_expert_in_the_summary_through_the_cli(tmp_path):
    m = make_tiny_moe("gpt_oss", vocab=300)
    starve(m, 1)
    m.save_pretrained(tmp_path / "m")
    make_tokenizer(300).save_pretrained(tmp_path / "m")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    s = quantize(tmp_path / "m", tmp_path / "q", "--expert-policy", "rtn", "--experts-per-pass", "3")
    for layer in s["layers"]:
        r = layer["experts"]["mlp.experts"]
        assert r["applied_to"] == [1] and r["policy"] == "rtn" and r["experts_per_pass"] == 3 and r["tokens"][1] == 0


def test_experts_per_pass_does_not_change_the_result(tmp_path):
    src = save_moe(tmp_path, "mixtral")
    quantize(src, tmp_path / "a", "--experts-per-pass", "1")
    quantize(src, tmp_path / "b")
    for f in sorted((tmp_path / "a").glob("model-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_on_the_fly_rtn_of_experts(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = save_moe(tmp_path, "gpt_oss")  # fused experts on disk, interleaved gate/up
    scheme = QuantScheme(bits=4, group_size=32)
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=llmq.LlmqConfig(bits=4, group_size=32),
                                             dtype=torch.float32)  # fmt: skip
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe.unfuse(fp)
    for e in range(4):
        for p in moe.PROJS:
            name = f"model.layers.1.mlp.experts.{e}.{p}"
            assert torch.equal(dequantized(q.get_submodule(name)),
                               rtn(fp.get_submodule(name).weight, scheme).dequantize(torch.float32))  # fmt: skip
    llmq.set_backend(q, "reference")
    dense = dense_of(q, AutoConfig.from_pretrained(src))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(q(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def test_on_the_fly_mixtral_saved_and_loaded_back(tmp_path):
    """save_pretrained keeps llmq's module names (not Mixtral's block_sparse_moe, which transformers would revert to)."""
    from transformers import AutoModelForCausalLM

    src = save_moe(tmp_path, "mixtral")
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=llmq.LlmqConfig(bits=4, group_size=32),
                                             dtype=torch.float32)  # fmt: skip
    q.save_pretrained(tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    for m in (q, back):
        llmq.set_backend(m, "reference")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_interrupted_in_a_layers_experts_resumes_byte_identical(tmp_path):
    src = save_moe(tmp_path, "qwen3_moe", num_hidden_layers=3)
    calib = ["--calib", str(tmp_path / "calib.txt")]
    quantize(src, tmp_path / "whole")
    # SIGKILL while layer 1's experts are being solved (the 3rd expert's first linear)
    p = quantize_killed_after("1:experts:6", src, tmp_path / "cut", *ARGS, *calib)
    assert p.returncode == -9, p.stderr[-2000:]
    assert incomplete(tmp_path / "cut")
    prog = json.loads((tmp_path / "cut" / "llmq_progress.json").read_text())
    assert sorted(map(int, prog["layers"])) == [0]
    main(["quantize", str(src), str(tmp_path / "cut"), *ARGS, *calib])
    whole = sorted(p.name for p in (tmp_path / "whole").glob("model-*.safetensors"))
    assert whole == sorted(p.name for p in (tmp_path / "cut").glob("model-*.safetensors"))
    for f in whole:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes()


# ---- bad input, refused before any layer is quantized ----------------------------------------------------------
def test_a_quantized_router_is_refused():
    m = make_tiny_moe("mixtral")
    plan = QuantPlan(QuantScheme(bits=4, group_size=32), {"model.layers.0.mlp.gate": QuantScheme(bits=8)})
    with pytest.raises(LlmqError, match="router.*full precision"):
        llmq.quantize(m, plan)
    plan = QuantPlan(QuantScheme(bits=4, group_size=32), {"model.layers.0.mlp.experts.9.gate_proj": QuantScheme()})
    with pytest.raises(LlmqError, match="not one of the model's"):
        llmq.quantize(m, plan)


def test_a_checkpoint_missing_an_experts_tensors_is_refused(tmp_path, capsys):
    src = save_moe(tmp_path, "mixtral")
    f = src / "model.safetensors"
    with safe_open(f, "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
        meta = h.metadata()
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"  # Mixtral's own name for expert 2's up_proj
    assert gone in t
    del t[gone]
    save_file(t, f, metadata=meta)
    assert main(["quantize", str(src), str(tmp_path / "q"), *ARGS, "--calib", str(tmp_path / "calib.txt")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in err and "lacks expert tensor" in err
    assert not (tmp_path / "q" / "llmq_progress.json").exists() or not json.loads(
        (tmp_path / "q" / "llmq_progress.json").read_text())["layers"]  # fmt: skip


def test_an_expert_count_that_does_not_match_the_config_is_refused(tmp_path, capsys):
    src = save_moe(tmp_path, "qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in cfg)
    cfg[key] = 2  # the checkpoint holds 4
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["quantize", str(src), str(tmp_path / "q"), *ARGS, "--calib", str(tmp_path / "calib.txt")]) == 2
    err = capsys.readouterr().err
    assert "holds 4 experts" in err and "config says 2" in err
    cfg[key] = 8  # the checkpoint holds only 4: experts 4..7 missing
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["quantize", str(src), str(tmp_path / "q2"), *ARGS, "--calib", str(tmp_path / "calib.txt")]) == 2
    assert "lacks expert tensor" in capsys.readouterr().err


def test_bad_expert_options_are_refused():
    with pytest.raises(LlmqError, match="expert_policy"):
        llmq.GPTQConfig(expert_policy="random")
    with pytest.raises(LlmqError, match="experts_per_pass"):
        llmq.GPTQConfig(experts_per_pass=-1)


def test_nan_in_an_expert_is_named(tmp_path):
    m = make_tiny_moe("mixtral")
    with torch.no_grad():
        m.model.layers[1].mlp.experts.down_proj[3, 0, 0] = math.nan
    with pytest.raises(LlmqError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight has 1 NaN"):
        llmq.quantize(m, QuantScheme(bits=4, group_size=32))


def perplexity(d: Path, tok_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tok_dir)(SAMPLE_TEXT, return_tensors="pt").input_ids[:, : 4 * 128].view(4, 128)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    llmq.set_backend(m, "reference")
    with torch.no_grad():
        return math.exp(m(ids, labels=ids).loss.item())


def test_torchrun_two_processes_give_the_tensors_of_one(tmp_path):
    from test_distributed import tensors, torchrun

    src = save_moe(tmp_path, "qwen3_moe")
    one = quantize(src, tmp_path / "one")
    torchrun(2, src, tmp_path / "two", *ARGS, "--calib", tmp_path / "calib.txt")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    codes = [k for k in a if "experts" in k and k.endswith(".qweight")]
    assert len(codes) == 2 * 4 * 3
    differ = sum(int((a[k] != b[k]).sum()) for k in codes) / sum(a[k].numel() for k in codes)
    assert differ < 0.05, differ  # summation order of the Hessians (partials added over ranks)
    # layer 0 sees the embeddings: the same routing on both; its experts' token counts sum over the ranks' windows
    assert one["layers"][0]["experts"] == two["layers"][0]["experts"]
    assert [r["windows"] for r in two["distributed"]["ranks"]] == [4, 4]
    p1, p2 = perplexity(tmp_path / "one", src), perplexity(tmp_path / "two", src)
    assert abs(p2 / p1 - 1) < 0.015, (p1, p2)


@pytest.mark.parametrize("mt", ["mixtral", "qwen3_moe"])
def test_compressed_tensors_export_loads_in_transformers_with_llmqs_logits(mt, tmp_path):
    """Per-expert tensors under the family's released names (Mixtral: block_sparse_moe.experts.E.w1/w3/w2), routers
    in `ignore`: transformers + compressed-tensors fuse them into its experts and compute llmq's model."""
    from transformers import AutoModelForCausalLM

    src = save_moe(tmp_path, mt)
    quantize(src, tmp_path / "q", "--sym", "--method", "rtn")
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--to", "compressed-tensors", "--quiet"]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    router = "model.layers.1.block_sparse_moe.gate" if mt == "mixtral" else "model.layers.1.mlp.gate"
    assert router in cfg["ignore"]
    with safe_open(next((tmp_path / "ct").glob("*.safetensors")), "pt") as h:
        names = set(h.keys())
    expert = "block_sparse_moe.experts.2.w3" if mt == "mixtral" else "mlp.experts.2.up_proj"
    assert f"model.layers.1.{expert}.weight_packed" in names
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    llmq.set_backend(q, "reference")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ct(ids).logits, q(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-3  # the experts decompressed to float16 by transformers


def test_gguf_export_stacks_the_experts(tmp_path, capsys):
    import gguf

    src = save_moe(tmp_path, "qwen3_moe")
    quantize(src, tmp_path / "q", "--format", "q8_0", "--method", "rtn")
    g = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "q"), str(g), "--to", "gguf", "--quiet"]) == 0
    r = gguf.GGUFReader(g)
    t = {x.name: x for x in r.tensors}
    assert t["blk.1.ffn_up_exps.weight"].tensor_type.name == "Q8_0"
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert list(t["blk.1.ffn_down_exps.weight"].shape) == [96, 64, 4]  # ggml's ne: in, out, expert
    assert r.fields["qwen3moe.expert_count"].contents() == 4
    from llmq.checkpoint import CheckpointReader
    from llmq.codec import decode, module_keys
    from llmq.record import read

    _, rec = read(tmp_path / "q")
    reader = CheckpointReader(tmp_path / "q")
    stack = gguf.quants.dequantize(t["blk.1.ffn_up_exps.weight"].data, t["blk.1.ffn_up_exps.weight"].tensor_type)
    for e in range(4):
        n = f"model.layers.1.mlp.experts.{e}.up_proj"
        qw = decode(rec.modules[n], reader.load(module_keys(rec.modules[n], reader.keys())))
        assert torch.equal(torch.from_numpy(stack[e].copy()), qw.dequantize(torch.float32)), e
    bad = tmp_path / "mixed"  # experts of one layer in two types: one GGUF tensor cannot hold them
    quantize(src, bad, "--method", "gptq", "--target-bpw", "6", "--candidates", "q4_0,q8_0")
    capsys.readouterr()
    assert main(["export", str(bad), str(tmp_path / "x.gguf"), "--to", "gguf", "--quiet"]) == 2
    assert "stacks a layer's experts into one tensor of one type" in capsys.readouterr().err
