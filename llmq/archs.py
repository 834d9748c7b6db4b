"""Architectures as data: where a causal LM keeps its decoder layers and which linears they hold.

`sequential` lists, per decoder layer, the groups of linears (names relative to the layer) in the order
their inputs become available: q/k/v read the same input, o reads attention's output, and so on. The
pipeline quantizes one group, then re-runs the layer so that the next group sees quantized inputs.
`blocks` names the layer's sub-blocks whose output is their last linear's output (attention -> o_proj, MLP ->
down_proj): once every linear of a block is quantized, GPTQ replays the block from that linear's recorded input
instead of recomputing it (pipeline.py; checked on every layer, a block that does not return that very tensor
is recomputed). `transposed` marks GPT-2's Conv1D, which stores its weight as [in, out].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LlmqError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]
    transposed: bool = False
    blocks: tuple[tuple[str, str], ...] = ()  # (sub-block, the linear whose output it returns)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)


_LLAMA = ArchSpec(
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    blocks=(("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")),
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchSpec(
        layers="transformer.h",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        transposed=True,
        blocks=(("attn", "attn.c_proj"), ("mlp", "mlp.c_proj")),
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        blocks=(("self_attn", "self_attn.out_proj"), ("fc2", "fc2")),
    ),
}


def arch_for(config) -> ArchSpec:
    """The ArchSpec for a transformers config, or an error listing the supported families."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise LlmqError(
            f"model type {mt!r} is not supported yet; supported: {', '.join(sorted(ARCHS))}. "
            "Adding one is a few lines of data in llmq/archs.py"
        )
    return ARCHS[mt]


def decoder_layers(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.layers)


def quantizable_names(model: torch.nn.Module, spec: ArchSpec) -> list[str]:
    """Full names of every linear to quantize, layer by layer, in sequential order."""
    n = len(decoder_layers(model, spec))
    return [f"{spec.layers}.{i}.{rel}" for i in range(n) for rel in spec.linears]


def weight_of(module: torch.nn.Module, spec: ArchSpec) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.t() if spec.transposed else module.weight
