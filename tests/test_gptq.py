"""GPTQ against round-to-nearest on the same grid, on a linear layer fed correlated inputs."""
import pytest
import torch

from llmq.algorithms.gptq import gptq
from llmq.algorithms.rtn import rtn
from llmq.config import GPTQConfig, QuantScheme
from llmq.errors import LlmqError


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    R, C, n = 192, 384, 3072
    A = torch.randn(C, C, generator=g) / C**0.5 + 0.3 * torch.eye(C)  # correlated input channels
    X = torch.randn(n, C, generator=g) @ A
    X[:, :6] *= 15  # a few dominant channels, as real activations have
    W = torch.randn(R, C, generator=g)
    return W, X, 2 * X.T @ X / n


def out_err(W, Wh, X):
    return ((W - Wh) @ X.T).square().sum().item()


SCHEMES = {"int4": QuantScheme(bits=4, group_size=128), "int3": QuantScheme(bits=3, group_size=128),
           "nf4": QuantScheme(format="nf4", group_size=64),
           "nf3": QuantScheme(bits=3, format="nf3", group_size=64),
           "nf2": QuantScheme(format="nf2", group_size=32), "fp4": QuantScheme(format="fp4", group_size=64)}  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("act_order, static", [(False, False), (True, True), (True, False)])
def test_gptq_beats_rtn(layer, name, act_order, static):
    W, X, H = layer
    s = SCHEMES[name]
    e_rtn = out_err(W, rtn(W, s).dequantize(), X)
    e_gptq = out_err(W, gptq(W, H, s, GPTQConfig(act_order=act_order, static_groups=static)).dequantize(), X)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_act_order_not_worse(layer, name):
    W, X, H = layer
    s = SCHEMES[name]
    plain = out_err(W, gptq(W, H, s, GPTQConfig(act_order=False)).dequantize(), X)
    for static in (True, False):
        ao = out_err(W, gptq(W, H, s, GPTQConfig(act_order=True, static_groups=static)).dequantize(), X)
        assert ao <= 1.05 * plain, (ao, plain)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_outliers_lower_error_further(layer, name):
    W, X, H = layer
    s = SCHEMES[name]
    base = out_err(W, gptq(W, H, s).dequantize(), X)
    qw = gptq(W, H, QuantScheme(**(s.to_dict() | {"outliers": 0.005})))
    assert out_err(W, qw.dequantize(), X) < 0.9 * base
    assert len(qw.outliers()[2]) == round(0.005 * W.numel())


def test_clip_search_inside_gptq_helps_int3(layer):
    W, X, H = layer
    base = out_err(W, gptq(W, H, SCHEMES["int3"]).dequantize(), X)
    clip = out_err(W, gptq(W, H, QuantScheme(bits=3, group_size=128, clip_search=True)).dequantize(), X)
    assert clip < base


def test_permutation_stored_only_without_static_groups(layer):
    W, X, H = layer
    s = SCHEMES["int4"]
    assert gptq(W, H, s, GPTQConfig(act_order=True, static_groups=True)).perm is None
    qw = gptq(W, H, s, GPTQConfig(act_order=True, static_groups=False))
    assert qw.perm is not None and sorted(qw.perm.tolist()) == list(range(W.shape[1]))
    assert gptq(W, H, s, GPTQConfig(act_order=False)).perm is None


@pytest.mark.parametrize("group_size", [-1, 0, 100, 32])
@pytest.mark.parametrize("double_quant", [False, True])
def test_granularities_and_double_quant(layer, group_size, double_quant):
    W, X, H = layer
    s = QuantScheme(bits=4, group_size=group_size, double_quant=double_quant)
    assert out_err(W, gptq(W, H, s).dequantize(), X) < 0.6 * out_err(W, rtn(W, s).dequantize(), X)


def test_degenerate_hessian_no_nan():
    g = torch.Generator().manual_seed(1)
    R, C = 32, 96
    X = torch.randn(200, 8, generator=g) @ torch.randn(8, C, generator=g)  # rank 8
    X[:, 10:20] = 0  # dead inputs
    H = 2 * X.T @ X / 200
    W = torch.randn(R, C, generator=g)
    for s in SCHEMES.values():
        Wh = gptq(W, H, s).dequantize()
        assert torch.isfinite(Wh).all()
        if s.format != "nf2":  # NF2 has no zero level: dead inputs take ±s/4, harmless as their inputs are 0
            assert torch.all(Wh[:, 10:20] == 0)
    assert torch.isfinite(gptq(W, torch.zeros(C, C), SCHEMES["int4"]).dequantize()).all()


def test_not_positive_definite_gets_more_damping_then_error(caplog):
    C = 16
    H = -torch.eye(C)
    H[0, 0] = 16.0  # mean diag 1/16: even 100x damping (+0.0625) leaves -0.94 on the diagonal
    W = torch.randn(8, C)
    with pytest.raises(LlmqError, match="x.q_proj: Hessian is not positive definite even with damp=1"):
        gptq(W, H, SCHEMES["int4"], GPTQConfig(max_damp_tries=2), name="x.q_proj")
    assert "retrying with damp=0.1" in caplog.text
    H2 = torch.eye(C)
    H2[0, 0] = -0.5  # mean diag 0.906: damp 0.05 and 0.5 fail, 5 succeeds
    qw = gptq(W, H2, SCHEMES["int4"], GPTQConfig(damp=0.05, max_damp_tries=3))
    assert torch.isfinite(qw.dequantize()).all()


def test_nan_hessian_is_an_error():
    with pytest.raises(LlmqError, match="NaN"):
        gptq(torch.randn(4, 16), torch.full((16, 16), float("nan")), SCHEMES["int4"])


def test_handed_over_hessian_is_freed_before_the_column_loop(layer, monkeypatch):
    """The Hessian is the largest input (3.3 GB at a 70B down_proj): quantize_linear hands its only reference to
    gptq, which frees it once factored, so the Cholesky factor and U are the only C×C matrices of the loop."""
    import weakref

    from llmq.algorithms import gptq as gptq_mod
    from llmq.config import QuantPlan
    from llmq.pipeline import quantize_linear

    W, X, _ = layer
    seen = {}
    loop = gptq_mod._column_loop

    def spy(*a, **k):
        seen["alive"] = ref() is not None
        return loop(*a, **k)

    monkeypatch.setattr(gptq_mod, "_column_loop", spy)
    Hs = {"h": 2 * X.t() @ X / X.shape[0]}
    ref = weakref.ref(Hs["h"])
    want = gptq(W, Hs["h"], SCHEMES["int4"]).dequantize()  # the caller keeps H here: same result
    assert seen["alive"] is True
    got = quantize_linear(W, Hs.pop("h"), QuantPlan(SCHEMES["int4"]), "x", GPTQConfig()).dequantize()
    assert seen["alive"] is False and ref() is None
    assert torch.equal(got, want)
