import pytest
import torch

from llmq.algorithms.rtn import rtn
from llmq.config import QuantScheme, scheme_from_name
from llmq.errors import LlmqError
from llmq.formats import grid, grouping
from llmq.formats.fp import FP4_CODEBOOK
from llmq.formats.nf import NF2_CODEBOOK, NF3_CODEBOOK, NF4_CODEBOOK


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, 48, -1, 0])  # 48 does not divide 200: a short last group
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_int_error_within_half_step(bits, sym, group_size, scale_dtype):
    W = randn(33, 200, seed=bits)
    scheme = QuantScheme(bits=bits, sym=sym, group_size=group_size, scale_dtype=scale_dtype)
    qw = rtn(W, scheme)
    step = grouping.expand(qw.scales(), tuple(W.shape), group_size)
    err = (qw.dequantize() - W).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7), (err / step).max()
    assert qw.codes().max() <= scheme.maxq


@pytest.mark.parametrize("double_quant", [False, True])
def test_double_quant_keeps_half_step(double_quant):
    W = randn(300, 256, seed=3)
    qw = rtn(W, QuantScheme(bits=4, group_size=64, double_quant=double_quant))
    step = grouping.expand(qw.scales(), tuple(W.shape), 64)
    assert torch.all((qw.dequantize() - W).abs() <= step / 2 * (1 + 1e-4))


@pytest.mark.parametrize("fmt,bits,book", [("nf4", 4, NF4_CODEBOOK), ("nf3", 3, NF3_CODEBOOK),
                                          ("nf2", 2, NF2_CODEBOOK), ("fp4", 4, FP4_CODEBOOK)])
@pytest.mark.parametrize("group_size", [64, 128, 100])
def test_nf_picks_the_nearest_code(fmt, bits, book, group_size):
    W = randn(16, 300, seed=1)
    qw = rtn(W, QuantScheme(bits=bits, format=fmt, group_size=group_size, scale_dtype="float32"))
    s = grouping.expand(qw.scales(), tuple(W.shape), group_size)
    err = (qw.dequantize() - W).abs()
    best = (W.unsqueeze(-1) - book * s.unsqueeze(-1)).abs().amin(-1)  # nearest codebook point
    assert torch.allclose(err, best, atol=1e-6)
    assert qw.codes().max() < len(book) and "qzeros" not in qw.parts


def normal_float(bits: int, offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's construction (bitsandbytes create_normal_map) for any width."""
    n = 2 ** (bits - 1)
    q = torch.distributions.Normal(0.0, 1.0).icdf
    pos = q(torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1])
    neg = -q(torch.linspace(offset, 0.5, n, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.abs().max()).float()


def test_nf_codebooks_follow_qlora_construction():
    assert torch.allclose(normal_float(4), NF4_CODEBOOK, atol=1e-6)  # bitsandbytes' table
    assert torch.allclose(normal_float(3), NF3_CODEBOOK, atol=1e-6)
    assert len(NF3_CODEBOOK) == 8 and NF3_CODEBOOK[3] == 0  # exact zero, 3 negative, 4 positive values
    # at 2 bits the construction leaves one negative level and an exact zero; NF2 is symmetric instead
    assert torch.allclose(normal_float(2), torch.tensor([-1.0, 0.0, 0.3379152, 1.0]), atol=1e-6)
    assert torch.equal(NF2_CODEBOOK, -NF2_CODEBOOK.flip(0)) and not (NF2_CODEBOOK == 0).any()


def test_nf3_stores_3_bit_codes_and_no_zero_points():
    """nf3-g64-dq: 3 bits of codes + 8/64 of scale codes + the double-quant blocks, less than int3-g64-dq
    (which adds a 3-bit zero point per group); the error on normal weights is about the same."""
    W = randn(512, 1024, seed=5)
    nf3, int3 = rtn(W, scheme_from_name("nf3-g64-dq")), rtn(W, scheme_from_name("int3-g64-dq"))
    bpw = {k: 8 * q.nbytes() / W.numel() for k, q in {"nf3": nf3, "int3": int3}.items()}
    assert bpw["nf3"] == pytest.approx(3 + 8 / 64 + 64 / (64 * 256), abs=1e-9), bpw
    assert bpw["int3"] - bpw["nf3"] == pytest.approx(3 / 64, abs=1e-9), bpw
    e = {k: float((q.dequantize() - W).square().mean()) for k, q in {"nf3": nf3, "int3": int3}.items()}
    assert e["nf3"] < 1.1 * e["int3"], e


def test_fp4_is_e2m1_bit_patterns():
    """Code c is the E2M1 bit pattern s·e1e0·m (exponent bias 1, e = 0 subnormal), scaled so that 6 maps to 1."""
    for c in range(16):
        s, e, m = c >> 3, (c >> 1) & 3, c & 1
        value = (-1) ** s * (m * 0.5 if e == 0 else 2 ** (e - 1) * (1 + m / 2))
        assert FP4_CODEBOOK[c] == torch.tensor(value / 6, dtype=torch.float32), c
    assert sorted(set((FP4_CODEBOOK * 6).abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_fp4_never_emits_minus_zero_and_costs_what_nf4_costs():
    W = randn(512, 1024, seed=2)
    W[0, :64] = torch.tensor([-1e-7, 0.0, 1e-7, 3.0] * 16)  # tiny values of either sign round to +0
    fp4, nf4 = rtn(W, scheme_from_name("fp4-g64-dq")), rtn(W, scheme_from_name("nf4-g64-dq"))
    codes = fp4.codes()
    assert 8 not in codes.unique().tolist() and codes[0, :3].tolist() == [0, 0, 0]
    assert fp4.nbytes() == nf4.nbytes() and "qzeros" not in fp4.parts
    # QLoRA's finding on normally distributed weights: NF4's levels fit them better than FP4's
    e = {k: float((q.dequantize() - W).square().mean()) for k, q in {"fp4": fp4, "nf4": nf4}.items()}
    assert e["nf4"] < 0.85 * e["fp4"], e


def test_nf2_stores_2_bit_codes_and_beats_int2():
    """nf2-g64-dq: 2 bits of codes + 8/64 of scale codes + the double-quant blocks, 2/64 below int2-g64-dq (no
    zero points), and less squared error than the asymmetric int2 grid on bell-shaped weights (both with clip
    search): the int2 grid's integer zero point puts 0 on the grid and leaves one side a single level."""
    W = randn(512, 1024, seed=5)
    nf2, int2 = (rtn(W, scheme_from_name(n, clip_search=True)) for n in ("nf2-g64-dq", "int2-g64-dq"))
    bpw = {k: 8 * q.nbytes() / W.numel() for k, q in {"nf2": nf2, "int2": int2}.items()}
    assert bpw["nf2"] == pytest.approx(2 + 8 / 64 + 64 / (64 * 256), abs=1e-9), bpw
    assert bpw["int2"] - bpw["nf2"] == pytest.approx(2 / 64, abs=1e-9), bpw
    e = {k: float((q.dequantize() - W).square().mean()) for k, q in {"nf2": nf2, "int2": int2}.items()}
    assert e["nf2"] < 0.97 * e["int2"], e
    assert set(nf2.codes().unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [dict(format="nf3", bits=4), dict(format="nf4", bits=3), dict(format="nf5", bits=4),
                                 dict(format="nf2", bits=4), dict(format="fp4", bits=3)])
def test_nf_width_is_checked(bad):
    with pytest.raises(LlmqError, match="format="):
        QuantScheme(**bad)


def test_bits_default_to_the_formats_width():
    assert [QuantScheme(format=f).bits for f in ("int", "nf4", "nf3", "nf2", "fp4")] == [4, 4, 3, 2, 4]
    assert QuantScheme(format="nf3", group_size=64) == scheme_from_name("nf3-g64")


@pytest.mark.parametrize("block", [32, 64, 128])
def test_nf4_beats_int4_on_normal_weights(block):
    W = randn(512, 1024, seed=2)
    mse = {}
    for name, s in {"nf4": QuantScheme(format="nf4", group_size=block),
                    "int4-sym": QuantScheme(bits=4, sym=True, group_size=block),
                    "int4-asym": QuantScheme(bits=4, sym=False, group_size=block)}.items():  # fmt: skip
        mse[name] = (rtn(W, s).dequantize() - W).square().mean().item()
    # QLoRA's comparison: absmax int4 at the same block size. (Asymmetric int4 also stores a 4-bit zero
    # point per block, i.e. more bits per weight, and beats NF4 at blocks <= 64 on this data.)
    assert mse["nf4"] < 0.9 * mse["int4-sym"], mse
    if block >= 128:
        assert mse["nf4"] < mse["int4-asym"], mse


def scale_bits_per_weight(qw):
    p = qw.parts
    n = sum(p[k].numel() * p[k].element_size() for k in ("scales", "scales_q", "scales_step", "scales_off") if k in p)
    return 8 * n / (qw.shape[0] * qw.shape[1])


def test_double_quant_cuts_scale_share_like_qlora():
    W = randn(1024, 1024, seed=4)
    plain32 = rtn(W, QuantScheme(format="nf4", group_size=64, scale_dtype="float32"))
    plain16 = rtn(W, QuantScheme(format="nf4", group_size=64))
    dq = rtn(W, QuantScheme(format="nf4", group_size=64, double_quant=True))
    # QLoRA: 32/64 = 0.5 bits per weight of fp32 scales -> 8/64 + 32/(64*256) = 0.127.
    assert scale_bits_per_weight(plain32) == pytest.approx(0.5)
    assert scale_bits_per_weight(dq) == pytest.approx(8 / 64 + 64 / (64 * 256))  # one fp32 step + offset per block
    assert scale_bits_per_weight(plain32) / scale_bits_per_weight(dq) > 3.8
    assert scale_bits_per_weight(plain16) / scale_bits_per_weight(dq) > 1.9
    e_plain = (plain16.dequantize() - W).square().mean()
    e_dq = (dq.dequantize() - W).square().mean()
    assert e_dq < 1.05 * e_plain, (e_dq, e_plain)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int_fake_quantize_is_decode_of_encode_bit_for_bit(bits, sym):
    """The clip search's in-place quantize-dequantize must pick what the stored codes decode to: equal, not close
    (weights far outside the shrunk range clip to both ends)."""
    scheme = QuantScheme(bits=bits, sym=sym, group_size=64)
    fmt = grid(scheme)
    Wg = (randn(16, 4, 64, seed=bits) ** 3).contiguous()
    scale, zero = fmt.find_params(Wg, None, scheme, shrink=0.6)
    s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    want = fmt.decode(fmt.encode(Wg, s, z, scheme), s, z, scheme)
    got = fmt.quantize_dequantize(Wg, s, z, scheme)
    assert torch.equal(got, want)
    assert (want.abs() < Wg.abs()).any()  # some weights did clip
    assert torch.equal(Wg, (randn(16, 4, 64, seed=bits) ** 3))  # the input is left alone


def test_clip_search_lowers_error():
    W = randn(64, 512, seed=5) ** 3  # heavy tails: clipping pays
    for s in (QuantScheme(bits=3, group_size=128), QuantScheme(format="nf4", group_size=128)):
        plain = (rtn(W, s).dequantize() - W).square().sum()
        clipped = (rtn(W, QuantScheme(**(s.to_dict() | {"clip_search": True}))).dequantize() - W).square().sum()
        assert clipped < 0.95 * plain


def test_outliers_are_exact_and_counted():
    W = randn(64, 256, seed=6)
    W[3, 7] = 40.0
    base = rtn(W, QuantScheme(bits=4, group_size=128))
    qw = rtn(W, QuantScheme(bits=4, group_size=128, outliers=0.01))
    Wh = qw.dequantize()
    rows, cols, vals = qw.outliers()
    assert len(vals) == round(0.01 * W.numel())
    assert torch.equal(Wh[rows, cols], W[rows, cols].half().float())
    assert Wh[3, 7] == 40.0
    assert (Wh - W).square().sum() < 0.6 * (base.dequantize() - W).square().sum()
    assert qw.nbytes() - base.nbytes() == (64 + 1) * 4 + len(vals) * (2 + 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=3, format="nf4"), "nf4"),
        (dict(group_size=7), "group_size=7"),
        (dict(format="fp8"), "format='fp8'"),
        (dict(outliers=0.7), "outliers=0.7"),
        (dict(scale_dtype="int8"), "scale_dtype"),
    ],
)
def test_scheme_validation(kwargs, match):
    with pytest.raises(LlmqError, match=match):
        QuantScheme(**kwargs)


def test_scheme_is_frozen_and_roundtrips():
    s = QuantScheme(bits=3, group_size=64, sym=True, double_quant=True)
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(Exception):
        s.bits = 4
    with pytest.raises(LlmqError, match="unknown"):
        QuantScheme.from_dict({"bitz": 4})
