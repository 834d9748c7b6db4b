"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): a pure function gptq(W, H, scheme, cfg) -> QuantizedWeight.

Columns are quantized one at a time; the error of column j, scaled by the Cholesky factor of H⁻¹, is fed
into the columns not yet quantized (OBS update, paper eq. 2-3), lazily in blocks (§ "Lazy batch updates"),
with H⁻¹ through its Cholesky factor U (H⁻¹ = UᵀU, § "Cholesky reformulation"). Any grid works: the update
only needs q(w), so the NormalFloat codebooks (NF4, NF3) get the same error feedback as the integer grids.

Groups: with act_order the columns are visited by decreasing diag(H). `static_groups` fixes every group's
scale from the unquantized weight first, so the stored layout keeps the original column order; without it,
groups are formed in visiting order and the permutation is stored.
Outliers: chosen before the loop by SpQR's saliency (w − q(w))² / [H⁻¹]ᵢᵢ, left out of their group's
range, kept exact (fp16) — and, being exact, they still receive the error feedback of earlier columns.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..config import PER_CHANNEL, PER_TENSOR, GPTQConfig, QuantScheme
from ..dtypes import all_finite
from ..errors import LlmqError
from ..formats import grid, grouping, scales
from ..qtensor import QuantizedWeight, check_block_shape
from ..timing import phase
from . import outliers as outlier_sel
from .params import group_params, store_params
from .rtn import rtn

log = logging.getLogger("llmq")


def solve_cost(R: int, C: int) -> float:
    """The work of GPTQ on W [R, C], up to a constant: the Cholesky and inverse of H (~C³) and the column loop
    (~R·C²). What distributed.World.owners balances over ranks."""
    return float(C**3 + R * C * C)


def damped_cholesky(H: torch.Tensor, rp: torch.Tensor, dead: torch.Tensor, cfg: GPTQConfig,
                    name: str = "") -> torch.Tensor:  # fmt: skip
    """A = J·H·J (H in visiting order read backwards, J the reversal: H indexed by rp, the reversed visiting order;
    one C×C fp32 copy, dead inputs' diagonal set to 1), damped in place with λ = damp·mean(diag A), factored in
    place: -> L, lower-triangular, L·Lᵀ = A + λI, in A's memory (a column-major view). H is left alone.

    A Hessian that is not positive definite gets 10× the damping, up to cfg.max_damp_tries times (logged), from a
    fresh copy (a failed factorisation has overwritten A); then an LlmqError: never a silent fallback to
    round-to-nearest."""
    damp = cfg.damp
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt in range(cfg.max_damp_tries + 1):
        # A is symmetric: its transposed view is the same matrix, column-major, which LAPACK factors in place
        # (a row-major A is copied to a column-major temporary first: one more C×C matrix at the peak)
        A = H[rp.unsqueeze(1), rp.unsqueeze(0)].to(torch.float32).mT
        A.diagonal()[dead[rp]] = 1
        A.diagonal().add_(damp * torch.diagonal(A).mean())
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            return A
        del A
        if attempt < cfg.max_damp_tries:
            log.warning("%s: Hessian not positive definite with damp=%g; retrying with damp=%g", name or "layer",
                        damp, damp * 10)  # fmt: skip
        damp *= 10
    raise LlmqError(
        f"{name or 'layer'}: Hessian is not positive definite even with damp={damp / 10:g}; the calibration "
        "activations are degenerate (check the calibration text), or raise --damp"
    )


def inverse_cholesky_upper(L: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """L from damped_cholesky (handed over: freed here once U is solved) -> (U, diag(H⁻¹)), U upper-triangular, H⁻¹ = UᵀU.

    With J·H·J = L·Lᵀ: H = (J L J)(J L J)ᵀ, and J L J is upper-triangular, so H⁻¹ = UᵀU with U = (J L J)⁻¹ =
    J L⁻¹ J: one triangular solve, then the matrix reversed in place (J M J of a contiguous matrix is its storage
    read backwards). H⁻¹ itself is never formed, and with the factorisation in place at most two C×C matrices are
    alive at once (at C = 5632, a down_proj, each is 127 MB; at C = 28672, 3.3 GB)."""
    C = L.shape[0]
    U = torch.eye(C, dtype=L.dtype, device=L.device)
    torch.linalg.solve_triangular(L, U, upper=False, out=U)  # L⁻¹, lower
    del L
    _reverse_(U)
    if not all_finite(U):
        raise LlmqError(f"{name or 'layer'}: the inverse Hessian overflowed; the calibration activations are "
                        "degenerate (check the calibration text), or raise --damp")  # fmt: skip
    diag = torch.zeros(C, dtype=U.dtype, device=U.device)  # diag(UᵀU) = column sums of U², by row blocks
    for r in range(0, C, 1024):
        diag += U[r : r + 1024].square().sum(0)
    return U, diag


def _reverse_(x: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Reverse a contiguous tensor's storage in place, a chunk from each end at a time (no full-size copy)."""
    v = x.view(-1)
    n = v.numel()
    for i in range(0, n // 2, chunk):
        k = min(chunk, n // 2 - i)
        head = v[i : i + k].flip(0)
        v[i : i + k] = v[n - i - k : n - i].flip(0)
        v[n - i - k : n - i] = head


def _block_bounds(C: int, block: int, group_len: int | None) -> list[int]:
    """Block boundaries: every `block` columns, and every group start so groups never straddle a block."""
    b = set(range(0, C, block)) | (set(range(0, C, group_len)) if group_len else set())
    return sorted(b) + [C]


def gptq(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig(),
         name: str = "") -> QuantizedWeight:  # fmt: skip
    """W [R, C] (out, in), H [C, C] = 2XXᵀ/n of the layer's inputs -> QuantizedWeight. Neither is modified.
    H is the largest input: a caller that hands over its only reference (``gptq(W, Hs.pop(k), ...)``; CPython
    moves call arguments into the callee's frame) lets it be freed once factored."""
    if not all_finite(H):
        raise LlmqError(f"{name or 'layer'}: the Hessian has NaN/Inf entries; the calibration activations overflowed")
    check_block_shape(tuple(W.shape), scheme, name)
    W = W.detach().to(torch.float32).clone()
    H = H.detach()
    R, C = W.shape
    diagH = torch.diag(H).to(torch.float32)
    dead = diagH == 0  # inputs that were always zero: weight irrelevant, set to 0
    diagH[dead] = 1
    W[:, dead] = 0

    dev = W.device
    perm = torch.argsort(diagH, descending=True) if cfg.act_order else torch.arange(C, device=dev)
    with phase("cholesky"):
        factored = [damped_cholesky(H, perm.flip(0), dead, cfg, name)]
        del H  # freed here when the caller handed over its only reference
        U, hinv_diag_p = inverse_cholesky_upper(factored.pop(), name)  # L handed over: freed inside, before U fills
        hinv_diag = torch.empty_like(hinv_diag_p)
        hinv_diag[perm] = hinv_diag_p

    exact = None  # [R, C] original order: weights kept in fp16
    if scheme.outliers > 0:
        with phase("outliers"):
            W_hat = rtn(W, QuantScheme(**(scheme.to_dict() | {"outliers": 0.0}))).dequantize()
            exact = outlier_sel.by_sensitivity(W, W_hat, hinv_diag, scheme.outliers)

    gs = scheme.group_size
    L = grouping.group_len(C, gs)
    G = grouping.n_groups(C, gs)
    Rs = 1 if gs == PER_TENSOR else R
    # a llama.cpp K-quant's group scales share one fp16 scale per 256 columns: all groups are fixed up front
    dynamic = gs not in (PER_CHANNEL, PER_TENSOR) and not (cfg.act_order and cfg.static_groups) and scheme.block is None
    keep = None if exact is None else ~exact
    scale = torch.zeros(Rs, G, device=dev)
    zero = torch.zeros(Rs, G, device=dev) if scheme.has_zeros or (scheme.block is not None and scheme.block.offset) else None
    eff, stored = torch.zeros(Rs, G, device=dev), None
    if not dynamic:  # all group parameters up front, from the unquantized weight, original column order, as stored
        with phase("clip_search" if scheme.clip_search else "params"):
            scale, zero = group_params(W, scheme, keep, diagH)
        with phase("params"):
            eff, zero, stored = store_params(scale, zero, scheme)

    # visiting order: column j of Wp is original column perm[j]
    Wp = W[:, perm]
    exact_p = None if exact is None else exact[:, perm]
    # each visited column's group, on the host once (the loop indexes with it: no device sync per column)
    group_of = ((perm.cpu() if not dynamic else torch.arange(C)) // L if gs != PER_TENSOR
                else torch.zeros(C, dtype=torch.long)).tolist()  # fmt: skip
    codes = torch.zeros(R, C, dtype=torch.uint8, device=dev)
    kept = None if exact is None else torch.zeros(R, C, device=dev)  # exact values (outliers), visiting order
    with phase("column_loop"), _loop_threads(W.device, R):
        _column_loop(Wp, U, codes, scale, zero, eff, exact_p, kept, group_of, scheme, cfg, L if dynamic else None,
                     diagH[perm])  # fmt: skip

    with phase("params"):
        if stored is None:
            stored = scales.store(scale, scheme)[1]
        out = None if exact_p is None else (exact_p, kept)
        if cfg.act_order and not dynamic:  # back to the original column order: no permutation stored
            inv = torch.argsort(perm)
            codes = codes[:, inv]
            out = None if out is None else (out[0][:, inv], out[1][:, inv])
            return QuantizedWeight.build(codes, stored, zero, scheme, out)
        return QuantizedWeight.build(codes, stored, zero, scheme, out, perm if cfg.act_order else None)


# below this many rows the column loop's per-column updates are too small to share between CPU threads: measured
# (2 threads, 2-core EPYC) 576 rows gain nothing in wall time and burn twice the CPU; 1024 rows gain 1.25x
LOOP_PARALLEL_ROWS = 1024


@contextlib.contextmanager
def _loop_threads(device: torch.device, rows: int):
    """One CPU thread for the column loop of a matrix with few rows (the rest of GPTQ keeps them all)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or rows >= LOOP_PARALLEL_ROWS or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _column_loop(Wp, U, codes, scale, zero, eff, exact_p, kept, group_of: list[int], scheme: QuantScheme, cfg: GPTQConfig,
                 dyn_len: int | None, diagH_p) -> None:  # fmt: skip
    """The GPTQ column loop over Wp [R, C] (visiting order, updated in place): fills codes / kept, and with
    dynamic groups (dyn_len = their length) each group's scale / zero / effective scale as it is reached."""
    g = grid(scheme)
    R, C = Wp.shape
    L = dyn_len

    bounds = _block_bounds(C, cfg.block_size, L)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if L and i1 % L == 0:  # a new group starts here: Wp[:, i1:] is up to date
            gi = i1 // L
            s, z = group_params(Wp[:, i1 : i1 + L], scheme, None if exact_p is None else ~exact_p[:, i1 : i1 + L],
                                diagH_p[i1 : i1 + L])  # fmt: skip
            scale[:, gi : gi + 1] = s
            eff[:, gi : gi + 1] = scales.store(s, scheme)[0]
            if zero is not None:
                zero[:, gi : gi + 1] = z
        # the block is held transposed, [B, R]: column j of W is a contiguous row (fast on CPU)
        W1 = Wp[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        C1 = torch.zeros(i2 - i1, R, dtype=torch.uint8, device=Wp.device)
        U1 = U[i1:i2, i1:i2]
        effT = eff.t().contiguous()  # [G, Rs]
        zeroT = None if zero is None else zero.t().contiguous()
        gids = group_of[i1:i2]
        for i in range(i2 - i1):
            w = W1[i]
            s = effT[gids[i]]
            z = None if zeroT is None else zeroT[gids[i]]
            c = g.encode(w, s, z, scheme)
            q = g.decode(c, s, z, scheme)
            if exact_p is not None:
                ex = exact_p[:, i1 + i]
                q = torch.where(ex, w.half().float(), q)
                kept[:, i1 + i] = torch.where(ex, q, kept[:, i1 + i])
            C1[i] = c
            err = (w - q) / U1[i, i]
            W1[i + 1 :] -= U1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(0)  # eq. 3, within the block
            Err1[i] = err
        codes[:, i1:i2] = C1.t()
        Wp[:, i2:] -= Err1.t() @ U[i1:i2, i2:]  # lazy batch update of the remaining columns

