"""Rotations fused into the weights before quantization (QuaRot's and SpinQuant's R1 and R2, no online transform).

A few residual-stream channels of an LLM carry values orders of magnitude above the rest, and a per-group grid
spends its few levels on them. An orthogonal Q spreads every channel over all of them (incoherence: QuIP, QuaRot,
SpinQuant). In an RMSNorm model it can be fused into the weights, leaving a model of the same architecture:

- each RMSNorm's weight γ is folded into the linears that read its output (W ← W·diag(γ); the norm keeps weight 1),
  so RMSNorm(x·Q) = RMSNorm(x)·Q (Q preserves the norm of x);
- the residual stream becomes x·Q: the embeddings E ← E·Q, every linear that writes the stream (o_proj, down_proj)
  W ← Qᵀ·W (and its bias b ← Qᵀ·b), every linear that reads it (q/k/v, gate/up, the head) W ← W·Q;
- per attention head, Qₕ between v_proj and o_proj: v_proj's rows of head h ← Qₕᵀ·W (bias likewise), o_proj's
  columns of head h ← W·Qₕ (the same Qₕ for every head, so grouped-query attention keeps working).

Tied embeddings cannot stay tied: the head reads the final norm, whose γ must be folded into it (E·diag(γ)·Q), while
the embedding table is E·Q; the head is written as its own tensor (V × H more in the file; stated in the summary).

Q: "hadamard" is a randomized Hadamard matrix D·H/√n (D random ±1 signs, H a Hadamard matrix of order n built by
Sylvester's doubling from a Paley matrix, e.g. 576 = 16 · 36, 36 from Paley II over GF(17)): every entry ±1/√n, the
most incoherent choice, which QuaRot measured better than a random orthogonal matrix. "random" is a Haar-random
orthogonal matrix (QR of a Gaussian). Everything is computed in float64 and rounded once into the layer's dtype.

GPT-2 and OPT are refused: LayerNorm subtracts the mean and adds a bias, which do not commute with a rotation (fusing
one would need SliceGPT's conversion of LayerNorm to RMSNorm, a different architecture).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .archs import arch_for, decoder_layers
from .errors import LlmqError

KINDS = ("none", "hadamard", "random")
# what benchmarks/results/rotation.md measured (filled in from it; --help and the README say it)
ROTATE_WHEN = ("Measured on SmolLM2 (benchmarks/results/rotation.md): with --method gptq it removes 8-29%% of "
               "the perplexity increase at 2-4 bits (costs 11%% at NF3); with RTN the model collapses: use it with "
               "GPTQ only")
# architectures whose norms are RMSNorm with a weight only, and whose layers' linears are named as Llama's
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))  # fmt: skip
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_WHY = {mt: f"{name}'s LayerNorm subtracts the mean and adds a bias, which do not commute with a rotation"
        for mt, name in (("gpt2", "GPT-2"), ("opt", "OPT"))}
_GEMMA = ("its norms scale by 1 + w and also sit after attention and the MLP (a norm after a writer does not commute "
          "with a rotation of the residual stream)")
_WHY |= {
    "olmo2": "its norms sit after attention and the MLP, on what they write to the residual stream: a norm after a "
             "writer does not commute with a rotation of that stream",
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "deepseek_v3": "its MLA attention normalises the low-rank latents (q_a_layernorm, kv_a_layernorm) between two "
                   "linears; the fusion rules for that are not written yet",
}  # fmt: skip


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "none"  # none | hadamard | random
    seed: int = 0  # the random signs (hadamard) or the random matrix (random)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LlmqError(f"rotate={self.kind!r} is not supported; use one of {', '.join(KINDS)}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        why = _WHY.get(mt, "llmq fuses rotations only where the rules of which norm feeds which linears are written "
                           "and tested (llmq/rotation.py); not yet for this family")
        raise LlmqError(f"--rotate: a {mt!r} model cannot be rotated ({why}); supported: {', '.join(SUPPORTED)}. "
                        "Quantize it with --rotate none")  # fmt: skip


# ---- Hadamard matrices ----------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) over GF(q), χ the quadratic character (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime ≡ 3 (mod 4): I + S, S = [[0, 1ᵀ], [-1, Q]] skew-symmetric."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return S + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] symmetric, each 0 -> [[1, -1], [-1, -1]] and
    each ±1 -> ±[[1, 1], [1, -1]]."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one) + torch.kron((C == 0).to(torch.float64), zero)


def _small_hadamard(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from one Paley construction (or 1, 2), else None."""
    if m in (1, 2):
        return torch.tensor([[1.0]], dtype=torch.float64) if m == 1 else torch.tensor([[1.0, 1.0], [1.0, -1.0]],
                                                                                       dtype=torch.float64)  # fmt: skip
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries ±1, H·Hᵀ = n·I), float64: Sylvester's doubling of a Paley matrix of
    order n / 2^k, the largest k that works. An LlmqError when none is found (then use a random rotation)."""
    for k in range(n.bit_length() - 1, -1, -1):
        if n % (1 << k):
            continue
        base = _small_hadamard(n >> k)
        if base is not None:
            H = base
            for _ in range(k):
                H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
            return H
    raise LlmqError(f"--rotate hadamard: no Hadamard matrix of order {n} from the Sylvester/Paley constructions; "
                    "use --rotate random (a random orthogonal matrix) for this model")  # fmt: skip


def orthogonal(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """An n × n orthogonal matrix, float64: a randomized Hadamard D·H/√n, or Haar-random (QR of a Gaussian)."""
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return signs.view(-1, 1) * hadamard(n) / math.sqrt(n)
    if kind == "random":
        Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return Q * torch.sign(torch.diagonal(R)).view(1, -1)  # the sign fix makes the distribution Haar
    raise LlmqError(f"rotate={kind!r} is not a rotation; use hadamard or random")


# ---- fusing ---------------------------------------------------------------------------------------------------------
def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype).contiguous()


class Rotation:
    """The rotations of one model (Q [H, H] for the residual stream, Qₕ [d, d] per head) and how to fuse them into
    its tensors. `layer` and `rest` rotate freshly loaded (unrotated) tensors in place; `untie` gives a tied model
    its own head first."""

    def __init__(self, cfg: RotationConfig, config):
        check_supported(config)
        self.cfg = cfg
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // heads
        gen = torch.Generator().manual_seed(cfg.seed)
        self.Q = orthogonal(cfg.kind, hidden, gen)
        self.Qh = orthogonal(cfg.kind, self.head_dim, gen)

    @staticmethod
    def untie(model) -> bool:
        """A tied head becomes its own parameter (its values are made by `rest`); True when it was tied."""
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        # a model built on the meta device is tied only once tie_weights() runs: the config says it will be
        tied = out is not None and (out.weight is emb.weight or model.config.get_text_config().tie_word_embeddings)
        if not tied:
            return False
        out.weight = torch.nn.Parameter(torch.empty_like(emb.weight), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}
        return True

    @torch.no_grad()
    def layer(self, layer: torch.nn.Module) -> None:
        """Fuse the rotations into one decoder layer (its tensors as in the source checkpoint)."""
        Q, Qh, d = self.Q, self.Qh, self.head_dim
        for norm_name, readers in _READERS:
            norm = layer.get_submodule(norm_name)
            if getattr(norm, "bias", None) is not None:
                raise LlmqError(f"--rotate: {norm_name} has a bias; only RMSNorm layers can be rotated")
            g = norm.weight.double()
            for r in readers:
                lin = layer.get_submodule(r)
                _set(lin.weight, (lin.weight.double() * g) @ Q)
            norm.weight.fill_(1.0)
        for w in _WRITERS:
            lin = layer.get_submodule(w)
            _set(lin.weight, Q.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, Q.T @ lin.bias.double())
        v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
        Wv = v.weight.double()
        _set(v.weight, (Qh.T @ Wv.view(-1, d, Wv.shape[1])).reshape(Wv.shape))
        if v.bias is not None:
            _set(v.bias, (v.bias.double().view(-1, d) @ Qh).reshape(-1))
        Wo = o.weight.double()
        _set(o.weight, (Wo.view(Wo.shape[0], -1, d) @ Qh).reshape(Wo.shape))

    @torch.no_grad()
    def rest(self, model, embedding: bool = True, head: bool = True, head_from_embedding: bool = False) -> None:
        """Fuse the rotation into the embeddings and, with `head`, the final norm into the head and the head's
        rotation (each as read from the source); head_from_embedding: an untied head is made from the embedding
        table (read now, unrotated)."""
        emb = model.get_input_embeddings()
        E = emb.weight.double()
        if head:
            out, norm = model.get_output_embeddings(), model.get_submodule("model.norm")
            W = E if head_from_embedding else out.weight.double()
            out.weight = torch.nn.Parameter(((W * norm.weight.double()) @ self.Q).to(emb.weight.dtype),
                                            requires_grad=False)  # fmt: skip
            norm.weight.fill_(1.0)
        if embedding:
            _set(emb.weight, E @ self.Q)

    def whole(self, model) -> bool:
        """Fuse the rotations into every tensor of a resident model (as loaded); True when its head was tied."""
        tied = self.untie(model)
        for layer in decoder_layers(model, arch_for(model.config)):
            self.layer(layer)
        self.rest(model, head_from_embedding=tied)
        return tied

    def record(self) -> dict:
        return {"kind": self.cfg.kind, "seed": self.cfg.seed}


def rotate_model(model, kind: str = "hadamard", seed: int = 0) -> Rotation | None:
    """Fuse a rotation into a resident model in place (its logits stay those of the original up to float
    rounding); returns the Rotation (None for kind="none"). Then quantize it as any other model."""
    cfg = RotationConfig(kind, seed)
    if not cfg.active:
        return None
    rot = Rotation(cfg, model.config)
    rot.whole(model)
    return rot
