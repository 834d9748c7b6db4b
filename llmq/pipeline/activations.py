"""The calibration activations of the current decoder layer: captured at layer 0, run through a layer (whole or
stopped early by the hooks), advanced to the next layer."""
from __future__ import annotations

import contextlib
import logging
import traceback
from dataclasses import dataclass, field

import torch

from .. import timing
from ..archs import ArchSpec, decoder_layers
from ..distributed import World
from ..errors import LlmqError
from .hessian import _HessianHooks, _Stop
from .replay import _Replay

log = logging.getLogger("llmq")
ERR_TOKENS = 2048  # the relative output error is measured on the first windows covering this many tokens


class _Catcher(torch.nn.Module):
    """Stands in for layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __getattr__(self, name):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        self.args, self.kwargs = args, kwargs
        raise _Stop


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer0_inputs(model, spec: ArchSpec, calib: torch.Tensor, act_device) -> tuple[list, tuple, dict]:
    """Inputs of decoder layer 0 for each calibration window, and the layer arguments (same for all)."""
    layers = decoder_layers(model, spec)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for row in calib:
            try:
                model(row.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = catcher.layer
    return [x.to(act_device) for x in catcher.inputs], catcher.args, catcher.kwargs


def _run_layer(layer, x, args, kwargs, device):
    out = layer(x.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Activations:
    """Inputs of the current decoder layer for every calibration window, and the layer's extra arguments."""

    inps: list[torch.Tensor]
    args: tuple
    kwargs: dict
    device: torch.device
    act_device: torch.device | str = "cpu"
    world: World = field(default_factory=World)
    ids: list[int] | None = None  # the calibration windows `inps` are (indices into all ranks' windows); None: all
    total: int | None = None  # windows over all ranks
    refine_fp: list | None = None  # GPTQConfig.refine_target "fp": the fp model's inputs of this layer (prefixes)


def start_activations(model, spec: ArchSpec, calib: torch.Tensor, device=None, act_device="cpu",
                      world: World | None = None) -> Activations:  # fmt: skip
    """Layer 0's inputs for the calibration windows [N, L]; with a world, for this rank's share of them."""
    if calib is None:
        raise LlmqError("GPTQ needs calibration data: pass --calib PATH|NAME (token windows)")
    world = world or World()
    device = torch.device(device) if device else torch.device("cpu")
    ids = world.windows(len(calib))
    inps, args, kwargs = capture_layer0_inputs(model, spec, calib[ids], act_device)
    return Activations(inps, _move(args, device), _move(kwargs, device), device, act_device, world, ids, len(calib))



def error_windows(acts: Activations) -> int:
    """How many windows the relative output error is measured on: the first ones covering ERR_TOKENS tokens."""
    if not acts.inps:
        return 0
    per = max(1, acts.inps[0].shape[:-1].numel())
    k = -(-ERR_TOKENS // per)  # the first k windows of all ranks: a prefix of each rank's own (r, r + W, ...)
    return len(acts.inps[:k]) if acts.ids is None else sum(1 for j in acts.ids[: len(acts.inps)] if j < k)


def _pass(layer, acts: Activations, hooks: _HessianHooks, replay: _Replay | None = None, full: int = 0,
          ref: list | None = None) -> None:  # fmt: skip
    """One pass of the layer over every window, for its hooks (stopped early). The first `full` windows run whole
    (timed as "error"): their outputs go to `ref`, and the replay's block check watches them."""
    timing.count("passes")
    for k, x in enumerate(acts.inps):
        hooks.new_window()
        hooks.stop = k >= full
        if replay is not None:
            replay.window = k
        whole = k < full
        check = replay.check() if whole and replay else contextlib.nullcontext()
        with timing.phase("error" if whole else "forward"), check:
            try:
                y = _run_layer(layer, x, acts.args, acts.kwargs, acts.device)
                if whole and ref is not None:
                    ref.append(y.to(acts.act_device))
            except _Stop as e:  # free the stopped pass's activations now, not at the next cyclic GC
                traceback.clear_frames(e.__traceback__)
    hooks.new_window()


@torch.no_grad()
def advance(layer, acts: Activations, ref_out: list | None = None, replay: _Replay | None = None,
            phase: str = "forward") -> float | None:  # fmt: skip
    """Run the layer on every window (timed as `phase`); its outputs replace `acts.inps`. Returns
    ‖Y − ref‖/‖ref‖ over the windows that have a reference output."""
    home = next(layer.parameters()).device
    layer.to(acts.device)
    timing.count("passes")
    num = den = 0.0
    for k, x in enumerate(acts.inps):
        if replay is not None:
            replay.window = k
        with timing.phase(phase):
            y = _run_layer(layer, x, acts.args, acts.kwargs, acts.device).to(acts.act_device)
        if ref_out and k < len(ref_out):
            with timing.phase("error"):
                num += (y - ref_out[k]).float().square().sum().item()
                den += ref_out[k].float().square().sum().item()
        acts.inps[k] = y
    layer.to(home)
    if ref_out is not None:
        num, den = acts.world.sum([num, den])
    return (num / den) ** 0.5 if den else None

