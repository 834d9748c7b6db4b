"""Mixture-of-experts layers as linears: each expert's gate, up and down projections become their own `nn.Linear`.

transformers 5 stores a layer's experts as fused 3-D parameters (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`;
gpt-oss `[E, H, 2I]` transposed, gate and up interleaved, with biases). Its `@use_experts_implementation` decorator
records the layout on every experts module (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`), so the layout
is read from the module, not listed per family. `unfuse(model)` replaces every such module by `LinearExperts`: a
ModuleList of `Expert`s named `experts.E.{gate_proj,up_proj,down_proj}` (the names of the released checkpoints and of
vLLM's MoE loaders), whose forward computes what the fused module computes (same routing, the module's own
`_apply_gate`). Every expert linear is then an ordinary linear to discovery, GPTQ, the checkpoint, QuantLinear and the
exports. The router (the MoE block's `gate`/`router`) is not an `nn.Linear` in these families and stays as it is, in
full precision.

Checkpoint names on disk (`disk_keys`): the released checkpoints store experts one by one, under names transformers'
conversion mapping knows (Mixtral `block_sparse_moe.experts.E.w1`, Qwen3-MoE `mlp.experts.E.gate_proj`); gpt-oss
stores them fused. Both are read, the fused ones sliced per expert.
"""
from __future__ import annotations

import functools
import re

import torch

from .errors import LlmqError

PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_count(config) -> int:
    """Routed experts per MoE layer from a transformers config (0 for a dense model)."""
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, k, None) if not isinstance(config, dict) else config.get(k)
        if n:
            return int(n)
    return 0


def is_fused_experts(m: torch.nn.Module) -> bool:
    """A transformers 5 experts module (3-D expert parameters)."""
    p = getattr(m, "down_proj", None)
    return isinstance(p, torch.nn.Parameter) and p.dim() == 3


class Expert(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden, inter, **kw)
        self.up_proj = torch.nn.Linear(hidden, inter, **kw)
        self.down_proj = torch.nn.Linear(inter, hidden, **kw)


class LinearExperts(torch.nn.ModuleList):
    """The experts of one MoE layer as `num_experts` Experts of three linears each.

    forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) as the fused module: each expert runs on the tokens
    routed to it, its output weighted and summed per token in the fused module's order. `calibrate_all`: every expert
    also runs on every token (its linears' hooks see them all: llm-compressor's `moe_calibrate_all_experts`), while
    only the routed tokens' outputs count. On the meta device (discovery) every expert runs on every token."""

    def __init__(self, fused: torch.nn.Module):
        kind = type(fused).__name__
        if not hasattr(fused, "has_gate") or not hasattr(fused, "is_transposed"):
            raise LlmqError(f"{kind}: an experts module that does not declare its layout (transformers' "
                            "@use_experts_implementation: transposed, interleaved, biases); not supported yet")  # fmt: skip
        if not (fused.has_gate and hasattr(fused, "gate_up_proj")):
            raise LlmqError(f"{kind}: experts without a gate projection (up and down only) are not supported yet")
        if getattr(fused, "has_post_expert_norm", False):
            raise LlmqError(f"{type(fused).__name__}: experts with a norm after each expert are not supported yet")
        gu, down = fused.gate_up_proj, fused.down_proj
        transposed = bool(fused.is_transposed)
        E = gu.shape[0]
        two_i, hidden = (gu.shape[2], gu.shape[1]) if transposed else (gu.shape[1], gu.shape[2])
        inter = two_i // 2
        bias = bool(getattr(fused, "has_bias", False))
        super().__init__([Expert(hidden, inter, bias, device=gu.device, dtype=gu.dtype) for _ in range(E)])
        self.transposed, self.concatenated = transposed, bool(fused.is_concatenated)
        self.num_experts, self.hidden, self.inter = E, hidden, inter
        self.calibrate_all = False
        if not gu.is_meta:
            with torch.no_grad():
                for e, ex in enumerate(self):
                    for proj, t in self.split(e, gu, down, getattr(fused, "gate_up_proj_bias", None),
                                              getattr(fused, "down_proj_bias", None)).items():  # fmt: skip
                        ex.get_parameter(proj).copy_(t)
        fused._parameters.clear()  # the shell keeps what _apply_gate reads (act_fn, alpha, limit), no weights
        self._shell = [fused]  # in a list: not a submodule (no state-dict entries, not moved by .to())

    def split(self, e: int, gate_up=None, down=None, gate_up_bias=None, down_bias=None) -> dict[str, torch.Tensor]:
        """Expert e's tensors from the fused ones given: {"gate_proj.weight": [I, H], ..., "down_proj.bias": [H]}."""
        out = {}
        if gate_up is not None:
            W = gate_up[e].t() if self.transposed else gate_up[e]  # [2I, H]
            out["gate_proj.weight"], out["up_proj.weight"] = self._halves(W)
        if down is not None:
            out["down_proj.weight"] = down[e].t() if self.transposed else down[e]
        if gate_up_bias is not None:
            out["gate_proj.bias"], out["up_proj.bias"] = self._halves(gate_up_bias[e])
        if down_bias is not None:
            out["down_proj.bias"] = down_bias[e]
        return out

    def fused(self, per_expert: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The fused module's tensors (gate_up_proj, down_proj, biases) from each expert's {"gate_proj.weight": ...}:
        the inverse of `split`."""
        def join(g, u):  # rows of gate and up -> [2I, ...] in the fused order
            return torch.cat([g, u]) if self.concatenated else torch.stack([g, u], 1).flatten(0, 1)

        gu = torch.stack([join(d["gate_proj.weight"], d["up_proj.weight"]) for d in per_expert])
        down = torch.stack([d["down_proj.weight"] for d in per_expert])
        out = {"gate_up_proj": gu.transpose(1, 2) if self.transposed else gu,
               "down_proj": down.transpose(1, 2) if self.transposed else down}  # fmt: skip
        if "gate_proj.bias" in per_expert[0]:
            out["gate_up_proj_bias"] = torch.stack([join(d["gate_proj.bias"], d["up_proj.bias"]) for d in per_expert])
            out["down_proj_bias"] = torch.stack([d["down_proj.bias"] for d in per_expert])
        return {k: v.contiguous() for k, v in out.items()}

    def _halves(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up rows of a fused [2I, ...] tensor: interleaved (gpt-oss) or concatenated."""
        return (t[0::2], t[1::2]) if not self.concatenated else (t[: self.inter], t[self.inter:])

    def _join(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([g, u], -1) if self.concatenated else torch.stack([g, u], -1).flatten(-2)

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self[e].down_proj(self.act_input(e, x))

    def act_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """down_proj's input for tokens x of expert e: the fused module's own gating of gate and up."""
        ex = self[e]
        return type(self._shell[0])._apply_gate(self._shell[0], self._join(ex.gate_proj(x), ex.up_proj(x)))

    @staticmethod
    def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [T, H], top-k expert index [T, k], top-k weights [T, k]) from the experts module's call."""
        vals = list(args) + [v for k, v in kwargs.items() if k not in ("hidden_states",)]
        hidden = kwargs.get("hidden_states", vals.pop(0) if vals else None)
        if hidden is None or len(vals) < 2:
            raise LlmqError("internal: the experts module was called without hidden states, expert index and weights")
        return hidden, vals[0], vals[1]

    @staticmethod
    def tokens_of(e: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k position, token) pairs routed to expert e, in the fused module's order."""
        return torch.where((index == e).t())

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden, index, weights = self.routing(args, kwargs)
        out = torch.zeros_like(hidden)
        if hidden.is_meta:  # discovery: no routing on the meta device; every expert sees every token
            for e in range(self.num_experts):
                out = out + self.run_expert(e, hidden)
            return out
        hit = torch.unique(index).tolist() if not self.calibrate_all else range(self.num_experts)
        for e in hit:
            if not 0 <= e < self.num_experts:  # expert-parallel padding index
                continue
            pos, tok = self.tokens_of(e, index)
            if self.calibrate_all:
                y = self.run_expert(e, hidden)[tok]
            elif not len(tok):
                continue
            else:
                y = self.run_expert(e, hidden[tok])
            out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.inter}"


def unfuse(model: torch.nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by LinearExperts, in place (weights copied, or meta on a meta
    model); returns the replaced modules' names."""
    done = []
    for name, m in list(model.named_modules()):
        if is_fused_experts(m) and not isinstance(m, LinearExperts):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, LinearExperts(m))
            done.append(name)
    return done


def expert_sets(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LinearExperts)]


EXPERT_RE = re.compile(r"^(?P<set>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def expert_of(rel: str, sets: tuple[str, ...]) -> tuple[str, int, str] | None:
    """(expert set, expert index, projection) of a linear's name inside a set; None for any other linear."""
    m = EXPERT_RE.match(rel)
    if m and m["set"] in sets:
        return m["set"], int(m["e"]), m["proj"]
    return None


# ---- names on disk -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _mapping(model_type: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(renamings model -> disk, {projection: disk pattern with '*' for the expert}) from transformers' conversion
    mapping for the model type."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        entries = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # noqa: BLE001 -- an older transformers without the mapping: checkpoint names as the model's
        entries = []
    renames, pats = [], {}
    for x in entries:
        src, tgt = list(getattr(x, "source_patterns", []) or []), list(getattr(x, "target_patterns", []) or [])
        if type(x).__name__ == "WeightRenaming" and len(src) == 1 and len(tgt) == 1:
            renames.append((tgt[0], src[0]))
        elif len(tgt) == 1 and tgt[0].endswith("gate_up_proj") and len(src) == 2:
            pats["gate_proj"], pats["up_proj"] = src
        elif len(tgt) == 1 and tgt[0].endswith("down_proj") and len(src) == 1:
            pats["down_proj"] = src[0]
    return renames, pats


def _plain(p: str) -> bool:
    return not re.search(r"[\\()\[\]^$+?|{}]", p)


def renamed(model_type: str, key: str) -> str | None:
    """A model key under the checkpoint's original names (Mixtral's `.mlp.` is `.block_sparse_moe.`), None when the
    mapping renames nothing in it."""
    out = key
    for model_pat, disk_pat in _mapping(model_type)[0]:
        if _plain(model_pat) and _plain(disk_pat) and model_pat in out:
            out = out.replace(model_pat, disk_pat)
    return out if out != key else None


def disk_keys(model_type: str, set_path: str, e: int, proj: str, what: str = "weight") -> list[str]:
    """Where expert e's `proj.what` of the experts module at `set_path` may be stored one by one, most likely first."""
    out = [f"{set_path}.{e}.{proj}.{what}"]
    pat = _mapping(model_type)[1].get(proj)
    if pat and _plain(pat.replace("*", "")) and pat.endswith(".weight"):
        stem = pat[: -len(".weight")].replace("*", str(e))  # e.g. ".experts.3.w1" / "mlp.experts.3.gate_proj"
        head = stem.split(".experts.")[0]  # what precedes .experts in the pattern ("" or "mlp")
        base = set_path.rsplit(".experts", 1)[0] if set_path.endswith("experts") else set_path
        if head and base.endswith(head):
            base = base[: -len(head)].rstrip(".")
        key = f"{base}.{stem.lstrip('.')}.{what}"
        out.append(key)
        r = renamed(model_type, key)
        if r:
            out.append(r)
    return list(dict.fromkeys(out))


def checkpoint_name(model_type: str, key: str) -> str:
    """A tensor of llmq's checkpoint under the name the family's released checkpoints use (what vLLM's loaders and
    llama.cpp's converter read): Mixtral's `mlp.experts.3.gate_proj.weight_packed` is
    `block_sparse_moe.experts.3.w1.weight_packed`, its `mlp.gate.weight` is `block_sparse_moe.gate.weight`. Names
    of families whose checkpoints use transformers' own names come back unchanged."""
    head, _, what = key.rpartition(".")
    x = EXPERT_RE.match(head)
    if x is not None:
        return disk_keys(model_type, x["set"], int(x["e"]), x["proj"], what)[-1]
    return renamed(model_type, key) or key


def fused_key(set_path: str, proj: str, what: str = "weight") -> str:
    """The fused 3-D tensor holding `proj.what` of every expert (gpt-oss's checkpoints; transformers' own names)."""
    base = "gate_up_proj" if proj in ("gate_proj", "up_proj") else "down_proj"
    return f"{set_path}.{base}" + ("_bias" if what == "bias" else "")
