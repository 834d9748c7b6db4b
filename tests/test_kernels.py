"""Triton dequant-GEMM kernels against their torch reference: every format, M sweep, ragged K and N.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before
the kernels are imported); with CUDA they run natively.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from llmq.algorithms.gptq import gptq  # noqa: E402
from llmq.algorithms.rtn import rtn  # noqa: E402
from llmq.config import GPTQConfig, QuantScheme  # noqa: E402
from llmq.backends.triton import matmul as triton_matmul, why_not as triton_why_not  # noqa: E402
from llmq.kernels import layout  # noqa: E402
from llmq.kernels.gemm import gemm  # noqa: E402
from llmq.kernels.skinny import skinny  # noqa: E402
from llmq.nn import QuantLinear  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
S = QuantScheme
FORMATS = {
    "int4-asym-g32": S(bits=4, group_size=32), "int4-sym-g128": S(bits=4, group_size=128, sym=True),
    "int4-asym-g48": S(bits=4, group_size=48),  # groups straddle kernel tiles
    "int4-asym-pc": S(bits=4, group_size=-1), "int4-asym-pt": S(bits=4, group_size=0),
    "int4-g64-dq": S(bits=4, group_size=64, double_quant=True), "int8-asym-pc": S(bits=8, group_size=-1),
    "int8-sym-g64": S(bits=8, group_size=64, sym=True), "nf4-g64": S(format="nf4", group_size=64),
    "nf4-g32-dq": S(format="nf4", group_size=32, double_quant=True), "int3-asym-g64": S(bits=3, group_size=64),
    "int2-asym-g32": S(bits=2, group_size=32), "int4-g128-bf16-scales": S(bits=4, group_size=128, scale_dtype="bfloat16"),
    "nf3-g64-dq": S(bits=3, format="nf3", group_size=64, double_quant=True),
    "nf3-g48": S(bits=3, format="nf3", group_size=48),
    "nf2-g64-dq": S(format="nf2", group_size=64, double_quant=True), "nf2-g48": S(format="nf2", group_size=48),
    "fp4-g64-dq": S(format="fp4", group_size=64, double_quant=True), "fp4-g48": S(format="fp4", group_size=48),
}  # fmt: skip
# relative error of the kernel vs the fp32 reference on the same dequantized weight, by activation dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
N, K = 72, 200  # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K or of 8


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def weight(scheme, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * (1 + 4 * torch.rand(n, 1, generator=g))  # rows of different scale
    return rtn(W, scheme)


@pytest.mark.parametrize("name", FORMATS)
def test_layout_dequantizes_like_the_checkpoint(name):
    qw = weight(FORMATS[name])
    tw = layout.repack(qw)
    assert torch.equal(layout.dequantize(tw).t(), qw.dequantize(torch.float32))
    codes = layout.unpack_words(tw.qw, tw.bits, K)
    assert torch.equal(layout.unpack_words(layout.pack_words(codes, tw.bits), tw.bits, K), codes)


@pytest.mark.parametrize("M", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("name", FORMATS)
def test_kernels_match_reference(name, M):
    tw = layout.repack(weight(FORMATS[name])).to(DEV)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEV, torch.float16)
    ref = layout.reference_matmul(x, tw)
    y = triton_matmul(x, {"triton": tw})
    assert y.shape == (M, N) and y.dtype == torch.float16
    assert rel(y, ref) < TOL[torch.float16], (name, M, rel(y, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 33])
def test_activation_dtypes(dtype, M):
    tw = layout.repack(weight(FORMATS["int4-asym-g32"])).to(DEV)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    y = triton_matmul(x, {"triton": tw})
    assert y.dtype == dtype and rel(y, layout.reference_matmul(x, tw)) < TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 3])
def test_skinny_split_k_and_tile_shapes(split_k):
    """Split-K partial sums (atomics) and a tile larger than the matrix give the same result."""
    tw = layout.repack(weight(FORMATS["nf4-g64"])).to(DEV)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(2)).to(DEV)
    ref = layout.reference_matmul(x, tw)
    for cfg in ({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k}, {"BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": split_k}):
        assert rel(skinny(x, tw, cfg), ref) < TOL[torch.float32]
    y = gemm(x, tw, {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64})
    assert rel(y, ref) < TOL[torch.float32]


@pytest.mark.skipif(CUDA, reason="checks the CPU (interpreter) path")
def test_quantlinear_triton_backend_with_outliers_and_act_order():
    """QuantLinear(backend='triton') applies the stored permutation and the sparse outliers like reference."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, K, generator=g) * torch.linspace(0.2, 3, K)
    W = torch.randn(N, K, generator=g)
    qw = gptq(W, 2 * X.t() @ X / 512, S(bits=4, group_size=32, outliers=0.01), GPTQConfig(static_groups=False))
    assert qw.perm is not None and "outlier_val" in qw.parts
    ref = QuantLinear(qw, torch.randn(N, generator=g), backend="reference")
    tri = QuantLinear(qw, ref.bias.data, backend="triton")
    assert tri.backend == "triton"
    for M in (1, 20):
        x = torch.randn(2, M, K, generator=g)
        assert rel(tri(x), ref(x)) < TOL[torch.float32]


@pytest.mark.skipif(CUDA, reason="checks the CPU (interpreter) path")
def test_row_split_linear_triton_backend():
    """A linear split by output row (pieces of 2, 3 and 4 bits with odd row counts) on the triton backend
    gives what the reference backend gives."""
    from llmq.config import RowSplit
    from llmq.nn import RowSplitLinear
    from llmq.qtensor import RowSplitWeight

    g = torch.Generator().manual_seed(3)
    W = torch.randn(N, K, generator=g)
    part = tuple(int(p) for p in torch.randint(0, 3, (N,), generator=g))
    schemes = (FORMATS["int2-asym-g32"], FORMATS["nf3-g64-dq"], FORMATS["int4-asym-g32"])
    qw = RowSplitWeight.quantize(W, RowSplit(schemes, part), rtn)
    ref = RowSplitLinear(qw, torch.randn(N, generator=g), backend="reference")
    tri = RowSplitLinear(qw, ref.bias.data, backend="triton")
    assert tri.backend == "triton"
    for M in (1, 20):
        x = torch.randn(2, M, K, generator=g)
        assert rel(tri(x), ref(x)) < TOL[torch.float32]


@pytest.mark.parametrize("scheme", ["int4-g128", "nf4-g64-dq"])
def test_from_pretrained_triton_backend_equals_reference(tmp_path, scheme):
    """End to end: a tiny Llama's llmq checkpoint loaded through from_pretrained (load_quantized) with the triton
    backend gives the reference backend's logits (fp16 on CUDA, fp32 under the interpreter)."""
    from tiny import make_tiny

    import llmq
    from llmq.config import scheme_from_name

    model = make_tiny("llama", vocab=256)
    plan = llmq.QuantPlan(scheme_from_name(scheme))
    llmq.save_quantized(model, llmq.quantize(model, plan, method="rtn"), tmp_path / "q", plan, {"name": "rtn"})
    dtype = torch.float16 if CUDA else torch.float32
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEV)
    logits = {}
    for backend in ("triton", "reference"):
        m = llmq.load_quantized(tmp_path / "q", dtype=dtype, device=DEV, backend=backend)
        with torch.no_grad():
            logits[backend] = m(ids).logits
        assert {q.backend for q in m.modules() if isinstance(q, QuantLinear)} == {backend}  # chosen at the first call
    assert rel(logits["triton"], logits["reference"]) < TOL[dtype]


def test_input_checks_are_precise():
    tw = layout.repack(weight(FORMATS["int4-asym-g32"]))
    with pytest.raises(ValueError, match="K = 100 columns"):
        triton_matmul(torch.randn(2, 100), {"triton": tw})
    with pytest.raises(ValueError, match="dtype torch.int32"):
        skinny(torch.zeros(2, K, dtype=torch.int32), tw)
    with pytest.raises(ValueError, match="contiguous"):
        skinny(torch.randn(K, 2).t(), tw)
    with pytest.raises(ValueError, match="2-D"):
        gemm(torch.randn(K), tw)
    with pytest.raises(ValueError, match="M = 17 > 16"):
        skinny(torch.randn(17, K), tw)


def test_why_not():
    assert triton_why_not(S(bits=4), (N, K), DEV) is None
    if not CUDA:
        os.environ.pop("TRITON_INTERPRET")
        try:
            assert "need CUDA" in triton_why_not(S(bits=4), (N, K), "cpu")
        finally:
            os.environ["TRITON_INTERPRET"] = "1"
