"""Architectures found by running a layer, not listed per model type.

`arch_for(config)` builds the model on the meta device (no memory, no weights: seconds for any size) and runs one
forward pass of a few tokens with a pre-hook on every `nn.Linear` (and GPT-2's `Conv1D`) of the decoder layers.
What the run shows becomes the layer's `ArchSpec`:

  layers      the ModuleList of decoder layers: `num_hidden_layers` entries that hold linears (the model's
              `_no_split_modules` class first, where several lists qualify)
  sequential  the layer's linears in groups: linears fed the very same input tensor form one group (one Hessian),
              groups in the order their input first appears (q/k/v, then o, then gate/up, then down for Llama;
              DeepSeek-V3's MLA: q_a and kv_a_with_mqa share the layer's input, then q_b, kv_b, o, ...)
  blocks      the layer's direct children whose output is their last linear's output (attention -> o_proj, MLP ->
              down_proj; a linear that is the layer's last is a block of its own, as OPT's fc2): GPTQ replays a
              finished block from that linear's recorded input (pipeline._Replay, checked again on real data)
  transposed  the linears are Conv1D (weight stored [in, out])

Every layer must show the same structure. Not quantized, by rule: anything outside the decoder layers (embeddings,
the head, a vision tower) and linears the forward pass never calls. Refused with the reason: a layer with a
mixture of experts (3-D expert parameters: not yet supported), a model whose decoder layers hold no linear, a model
the meta device cannot run. What no run can show stays data beside its user: the rotation's norm folds
(rotation.py), llama.cpp's names (gguf_names.py).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

import torch

from . import moe
from .errors import LlmqError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # layer 0's groups (every layer's, unless `kinds` says otherwise)
    transposed: bool = False
    blocks: tuple[tuple[str, str], ...] = ()  # (sub-block, the linear whose output it returns)
    experts: tuple[str, ...] = ()  # the layer's expert sets (moe.LinearExperts), e.g. ("mlp.experts",)
    # layers that differ (DeepSeek-V3's first dense layers before its MoE ones): per layer an index into `kinds`,
    # each kind (sequential, blocks, experts); empty when every layer is alike
    layer_kind: tuple[int, ...] = ()
    kinds: tuple[tuple, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)

    def at(self, i: int) -> ArchSpec:
        """The spec of decoder layer i (itself where every layer is alike)."""
        if not self.layer_kind:
            return self
        seq, blocks, experts = self.kinds[self.layer_kind[i]]
        return replace(self, sequential=seq, blocks=blocks, experts=experts, layer_kind=(), kinds=())

    def expert(self, rel: str) -> tuple[str, int, str] | None:
        """(set, expert, projection) of a linear inside one of the layer's expert sets, else None."""
        return moe.expert_of(rel, self.experts) if self.experts else None


def arch_for(config) -> ArchSpec:
    """The decoder layers' structure of a transformers causal-LM config, found by running the model on the meta
    device (cached per config); an LlmqError saying what was found and what to do where there is nothing to
    quantize or something llmq cannot handle."""
    try:
        key = config.to_json_string(use_diff=False)
    except (TypeError, ValueError):  # a config with values JSON cannot hold: not cached
        return _discover(config)
    return _cached(key, type(config))


@functools.lru_cache(maxsize=16)
def _cached(key: str, config_class) -> ArchSpec:
    return _discover(config_class.from_dict(json.loads(key)))


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    mt = getattr(config, "model_type", None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).eval()  # dropout off: blocks return their linear's output
    except (ValueError, KeyError, AttributeError, TypeError, AssertionError, RuntimeError) as e:
        raise LlmqError(f"model type {mt!r}: transformers builds no causal LM from this config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); llmq quantizes decoder-only causal LMs (for a "
                        "vision-language model, its text model)") from None  # fmt: skip
    moe.unfuse(model)  # experts as linears (moe.py): what every model llmq quantizes holds
    return model


def _find_layers(model, config) -> str:
    mt = getattr(config, "model_type", None)
    n = getattr(config, "num_hidden_layers", None)
    lin = _linear_types()
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and (n is None or len(m) == n) and any(isinstance(c, lin) for c in m[0].modules())]  # fmt: skip
    if not found:
        lists = [f"{name} ({len(m)})" for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        raise LlmqError(f"model type {mt!r}: found no decoder layers holding linears (num_hidden_layers = {n}; "
                        f"module lists: {', '.join(lists[:6]) or 'none'}); llmq quantizes the nn.Linear layers of "
                        "a decoder-only causal LM's decoder layers")  # fmt: skip
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    preferred = [name for name, m in found if type(m[0]).__name__ in no_split]
    path = (preferred or [name for name, _ in found])[0]
    parts = set(path.split("."))
    if parts & {"encoder", "vision_tower", "vision_model", "visual"}:
        what = "an encoder-only model" if "encoder" in parts and not parts & {"vision_tower", "vision_model", "visual"} \
            else "a vision-language model's top level"
        raise LlmqError(f"model type {mt!r}: the only layers with linears are {path} ({what}); llmq quantizes the "
                        "decoder layers of a causal LM: for a vision-language model, quantize its text model (its "
                        "text_config)")  # fmt: skip
    return path


def _refuse_experts(layers, mt) -> None:
    """Experts in a layout llmq/moe.py does not read (not transformers' fused gate_up_proj/down_proj) are refused."""
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            if p.dim() == 3:
                where = name.rpartition(".")[0] or name
                raise LlmqError(f"model type {mt!r}: decoder layer {i} holds experts as 3-D parameters in a layout "
                                f"llmq does not read ({where}: {name} {list(p.shape)}; llmq reads transformers' "
                                "fused gate_up_proj/down_proj experts: llmq/moe.py)")  # fmt: skip


def _discover(config) -> ArchSpec:
    mt = getattr(config, "model_type", None)
    model = _meta_model(config)
    path = _find_layers(model, config)
    layers = model.get_submodule(path)
    _refuse_experts(layers, mt)
    lin = _linear_types()
    calls: list[tuple[int, str, torch.Tensor]] = []  # (layer, linear, its input): the inputs are held, ids stay unique
    outputs: dict[tuple[int, str], object] = {}
    handles = []
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, lin):
                handles.append(m.register_forward_pre_hook(lambda mod, a, i=i, n=name: calls.append((i, n, a[0]))))
                handles.append(m.register_forward_hook(lambda mod, a, o, i=i, n=name: outputs.setdefault((i, n), o)))
        for name, child in layer.named_children():
            handles.append(child.register_forward_hook(
                lambda mod, a, o, i=i, n=name: outputs.setdefault((i, "<child>" + n), o)))  # fmt: skip
    try:
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception as e:  # noqa: BLE001 -- any failure of the model's own code is the user's answer
        raise LlmqError(f"model type {mt!r}: one forward pass on the meta device failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}), so its decoder layers' linears cannot be "
                        "discovered") from None  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    sets = [tuple(n for n in moe.expert_sets(layer)) for layer in layers]
    routers = [_routers(layer, s) for layer, s in zip(layers, sets)]
    per_layer = [_merge_experts(_groups([(n, x) for j, n, x in calls if j == i and n not in routers[i]]), sets[i])
                 for i in range(len(layers))]  # fmt: skip
    if not any(per_layer):
        raise LlmqError(f"model type {mt!r}: the forward pass called no linear inside the decoder layers ({path}); "
                        "nothing to quantize")  # fmt: skip
    types = {type(m) for m in layers[0].modules() if isinstance(m, lin)}
    if len(types) > 1:
        raise LlmqError(f"model type {mt!r}: a decoder layer mixes {sorted(k.__name__ for k in types)}")
    transposed = types.pop() is not torch.nn.Linear
    kinds: list[tuple] = []  # (sequential, blocks, experts) of each distinct layer structure, in order of first use
    layer_kind = []
    for i, groups in enumerate(per_layer):
        kind = (groups, _blocks(layers[i], groups, outputs, i), sets[i])
        if kind not in kinds:
            kinds.append(kind)
        layer_kind.append(kinds.index(kind))
    seq, blocks, experts = kinds[0]
    if len(kinds) == 1:
        return ArchSpec(path, seq, transposed, blocks, experts)
    return ArchSpec(path, seq, transposed, blocks, experts, tuple(layer_kind), tuple(kinds))


def _routers(layer, sets: tuple[str, ...]) -> set[str]:
    """Linears beside an expert set in its MoE block that give one output per expert or a single gate (Qwen2-MoE's
    shared_expert_gate): routers, kept in full precision as vLLM and llama.cpp keep them."""
    out = set()
    for s in sets:
        block = s.rpartition(".")[0]
        n = layer.get_submodule(s).num_experts
        for c, m in (layer.get_submodule(block).named_children() if block else layer.named_children()):
            if isinstance(m, _linear_types()) and m.weight.shape[0] in (1, n):
                out.add(f"{block}.{c}" if block else c)
    return out


def _merge_experts(groups: tuple[tuple[str, ...], ...], sets: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """One group for every expert's gate/up of a set and one for every expert's down (each expert keeps its own
    Hessian: pipeline/experts.py), in the place of the set's first group of that kind; a group mixing experts with
    other linears fed the same input (a shared expert) is split, the other linears first."""
    if not sets:
        return groups
    out: list[list[str]] = []
    where: dict[tuple[str, str], int] = {}
    for g in groups:
        dense = [n for n in g if not moe.expert_of(n, sets)]
        if dense:
            out.append(dense)
        for n in g:
            x = moe.expert_of(n, sets)
            if x is None:
                continue
            key = (x[0], "down" if x[2] == "down_proj" else "gate_up")
            if key not in where:
                where[key] = len(out)
                out.append([])
            out[where[key]].append(n)
    return tuple(tuple(sorted(g, key=_expert_order(sets))) if any(moe.expert_of(n, sets) for n in g) else tuple(g)
                 for g in out)  # fmt: skip


def _expert_order(sets):
    def key(n):
        x = moe.expert_of(n, sets)
        return (x[1], moe.PROJS.index(x[2])) if x else (-1, 0)

    return key


def _groups(calls: list[tuple[str, torch.Tensor]]) -> tuple[tuple[str, ...], ...]:
    """Linears in groups of the same input tensor, groups in order of the input's first use; a linear called
    again later keeps its first place."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        g = next((g for g in groups if g[0] is x), None)
        if g is None:
            groups.append((x, [name]))
        else:
            g[1].append(name)
    return tuple(tuple(names) for _, names in groups)


def _blocks(layer, sequential, outputs: dict, i: int = 0) -> tuple[tuple[str, str], ...]:
    """Direct children of layer i that return their last linear's output (the tensor itself, or a tuple with it
    first and None after); a linear child only where it is the layer's last linear."""
    order = [n for g in sequential for n in g]
    out = []
    for name, child in layer.named_children():
        inside = [n for n in order if n == name or n.startswith(name + ".")]
        if not inside or (inside == [name] and name != order[-1]):
            continue
        last = inside[-1]
        o, lo = outputs.get((i, "<child>" + name)), outputs.get((i, last))
        if lo is not None and (o is lo or (isinstance(o, tuple) and o and o[0] is lo and all(x is None for x in o[1:]))):
            out.append((name, last))
    return tuple(out)


def describe(config, spec: ArchSpec | None = None) -> dict:
    """What discovery found, for `llmq quantize` (printed before the first layer, and all `--dry-run` shows): the
    decoder layers, each group's linears with their [out, in] shapes, the replayed blocks, and the linears left in
    full precision by rule (outside the decoder layers). From the meta model: no weight is read."""
    spec = spec or arch_for(config)
    model = _meta_model(config)
    layers = model.get_submodule(spec.layers)
    lin = _linear_types()

    def shape(m) -> list[int]:
        w = m.weight
        return [int(w.shape[1]), int(w.shape[0])] if spec.transposed else [int(w.shape[0]), int(w.shape[1])]

    outside = [n for n, m in model.named_modules() if isinstance(m, lin) and not n.startswith(spec.layers + ".")]
    unused = sorted({n for i, layer in enumerate(layers) for n, m in layer.named_modules()
                     if isinstance(m, lin) and n not in spec.at(i).linears})  # fmt: skip
    routers = sorted({n.split(".", len(spec.layers.split(".")) + 1)[-1] for n in routers_of(model, spec)})
    kinds = []
    for k in range(max(spec.layer_kind, default=0) + 1):
        i = spec.layer_kind.index(k) if spec.layer_kind else 0
        s = spec.at(i)
        kinds.append({"layers": [j for j in range(len(layers)) if spec.at(j) == s],
                      "groups": [[{"name": n, "shape": shape(layers[i].get_submodule(n))} for n in g]
                                 for g in s.sequential],
                      "blocks": [list(b) for b in s.blocks], "experts": list(s.experts)})  # fmt: skip
    unused = [n for n in unused if n not in routers]
    return {"model_type": getattr(config, "model_type", None), "layers": spec.layers, "n_layers": len(layers),
            "layer_class": type(layers[0]).__name__, **{k: kinds[0][k] for k in ("groups", "blocks", "experts")},
            "kinds": kinds, "transposed": spec.transposed,
            "not_quantized": {"outside the decoder layers": outside, "never called by the layer": unused,
                              "routers (mixture of experts)": routers}}  # fmt: skip


def routers_of(model: torch.nn.Module, spec: ArchSpec) -> list[str]:
    """Full names of the routers of every MoE layer: the modules beside an expert set in its block that hold weights
    and are not quantized linears (Mixtral's `gate`, gpt-oss's `router`, Qwen2-MoE's `shared_expert_gate`). They stay in
    full precision; exports list them as not quantized."""
    out = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        lin = spec.at(i).linears
        for s in spec.at(i).experts:
            block = s.rpartition(".")[0]
            for c, m in layer.get_submodule(block).named_children():
                rel = f"{block}.{c}" if block else c
                if rel != s and not any(n == rel or n.startswith(rel + ".") for n in lin) and any(
                        p.dim() == 2 for p in m.parameters()):  # fmt: skip
                    out.append(f"{spec.layers}.{i}.{rel}")
    return out


def linear_shapes_of(config, spec: ArchSpec | None = None) -> tuple[dict[str, tuple[int, int]], int]:
    """({full name: (out, in)} of every linear to quantize, the number of decoder layers), from the meta model: what a
    plan needs, before any weight is read."""
    spec = spec or arch_for(config)
    model = _meta_model(config)
    names = quantizable_names(model, spec)
    return {n: tuple(weight_of(model.get_submodule(n), spec).shape) for n in names}, len(decoder_layers(model, spec))


def describe_lines(d: dict) -> list[str]:
    kinds = d.get("kinds") or [{"layers": list(range(d["n_layers"])), "groups": d["groups"], "blocks": d["blocks"],
                                "experts": []}]  # fmt: skip
    out = [f"{d['model_type']}: {d['n_layers']} decoder layers ({d['layers']}, {d['layer_class']})"
           + (f", {len(kinds)} kinds of layer:" if len(kinds) > 1 else ":")]  # fmt: skip
    for kind in kinds:
        n = sum(len(g) for g in kind["groups"])
        which = "" if len(kinds) == 1 else f"layers {_ranges(kind['layers'])}: "
        out.append(f" {which}{n} linears in {len(kind['groups'])} groups (one Hessian per group, each expert its own; "
                   "quantized in this order):")  # fmt: skip
        for k, g in enumerate(kind["groups"], 1):
            out.append(f"  {k}. " + _group_line(g, kind["experts"]))
        if kind["blocks"]:
            out.append("  replayed once quantized: "
                       + ", ".join(f"{b} (its output is {lin}'s)" for b, lin in kind["blocks"]))
    for why, names in d["not_quantized"].items():
        if names:
            out.append(f"  left in full precision ({why}): {', '.join(names)}")
    return out


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}-{xs[-1]}" if len(xs) > 1 and xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def _group_line(g: list[dict], experts: list[str]) -> str:
    """A group's linears with their shapes; an expert set's as one entry per projection (128 experts: one line)."""
    parts: dict[str, list] = {}
    for m in g:
        x = moe.expert_of(m["name"], tuple(experts))
        key = f"{x[0]}.{{0..}}.{x[2]}" if x else m["name"]
        parts.setdefault(key, [0, m["shape"]])[0] += 1
    return ", ".join(f"{k.replace('{0..}', f'{{0..{c - 1}}}') if c > 1 else k} {s[0]}x{s[1]}"
                     for k, (c, s) in parts.items())  # fmt: skip


def decoder_layers(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.layers)


def quantizable_names(model: torch.nn.Module, spec: ArchSpec) -> list[str]:
    """Full names of every linear to quantize, layer by layer, in sequential order."""
    n = len(decoder_layers(model, spec))
    return [f"{spec.layers}.{i}.{rel}" for i in range(n) for rel in spec.at(i).linears]


def weight_of(module: torch.nn.Module, spec: ArchSpec) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.t() if spec.transposed else module.weight
