"""Hessian accumulation: forward pre-hooks summing H = 2XᵀX/n of each linear's input (one H per distinct input),
stopping a pass once everything needed from it has been seen."""
from __future__ import annotations

import itertools
import logging

import torch

from .. import timing
from ..distributed import World
from ..errors import LlmqError

log = logging.getLogger("llmq")


class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""



def _blocks(C: int) -> list[int]:
    """Column block edges for the upper-triangle product: n <= 8 blocks of >= 128 columns."""
    n = max(1, min(8, C // 128))
    return [C * k // n for k in range(n + 1)]


def accumulate_xtx(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += xᵀx for x [tokens, C], upper block triangle only (`symmetrize` fills the rest): blocks i <= j of a
    split into n <= 8 column blocks, (n+1)/2n of a full product's work (56% at 8; measured 0.61x of one addmm's
    time at C = 1536, 0.66x at 576, one thread)."""
    for a, b in itertools.pairwise(_blocks(x.shape[1])):
        H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


def symmetrize(H: torch.Tensor) -> torch.Tensor:
    """Copy the upper block triangle accumulated by accumulate_xtx into the lower one, in place, block by block
    (no C×C temporaries: at C = 28672 a mask alone would be 822 MB)."""
    for a, b in itertools.pairwise(_blocks(H.shape[0])):
        H[b:, a:b].copy_(H[a:b, b:].t())
    return H


class _HessianHooks:
    """Forward pre-hooks accumulating H = 2XᵀX/n of each linear's input, before the linear runs.

    Linears fed the very same tensor (q/k/v; gate/up) share one H, found on the first window: one product per
    distinct input. With `stop`, the pass is stopped (raising _Stop) as soon as every distinct input of the
    window has been seen, so a group's own linears are not even computed. `record` names linears whose input
    is also kept per window (for _Replay), on `record_device`."""

    def __init__(self, modules: dict[str, torch.nn.Module], stop: bool = True, record: tuple[str, ...] = (),
                 record_device=None):  # fmt: skip
        self.H: dict[str, torch.Tensor | None] = {n: None for n in modules}
        self.count = {n: 0 for n in modules}
        self.alias: dict[str, str] = {}  # linear -> the linear whose H it shares
        self.stop = stop
        self.recorded: dict[str, list[torch.Tensor]] = {n: [] for n in record}
        self.record_device = record_device
        self._names = list(modules)
        self._window_inputs: list[tuple[torch.Tensor, str]] = []  # held for the window: no address reuse
        self._first = True
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def new_window(self) -> None:
        if self._window_inputs:
            self._first = False
        self._window_inputs = []

    def _hook(self, name):
        def hook(module, inputs):
            x = inputs[0]
            if name in self.recorded:
                self.recorded[name].append(x.detach().to(self.record_device))
            if name not in self.alias:
                same = next((n for t, n in self._window_inputs if t is x or (t.data_ptr() == x.data_ptr()
                             and t.shape == x.shape and t.stride() == x.stride())), None)  # fmt: skip
                if same is not None and self._first:
                    self.alias[name] = same
                else:
                    with timing.phase("hessian"):
                        xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, in]
                        if self.H[name] is None:
                            self.H[name] = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float32, device=xf.device)
                        accumulate_xtx(self.H[name], xf)
                        self.count[name] += xf.shape[0]
                    self._window_inputs.append((x, name))
            # first window: every linear fired (aliases are found then); later ones: every distinct input seen
            seen = {n for _, n in self._window_inputs}
            if self.stop and all(n in seen or n in self.alias for n in self._names):
                raise _Stop

        return hook

    def hessians(self, world: World | None = None, owners: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """The accumulated H, scaled in place (no copies: at C = 5632 each is 127 MB); shared ones appear under
        every linear that reads them. With a world: this rank's partial sums are added over the ranks onto the
        owner(s) of each H's readers (`owners`: linear -> rank), and only this rank's linears are returned."""
        world = world or World()
        owners = owners or dict.fromkeys(self._names, world.rank)
        keys = [n for n in self._names if n not in self.alias]
        for n in keys:
            if self.H[n] is None:
                raise LlmqError(f"{n}: the layer never called this linear on the calibration windows; its model "
                                "code does not match llmq's architecture table (llmq/archs.py)")  # fmt: skip
        counts = dict(zip(keys, world.sum([float(self.count[n]) for n in keys])))
        dests = {k: [owners[n] for n in self._names if self.alias.get(n, n) == k] for k in keys}
        H = world.reduce({k: self.H.pop(k) for k in keys}, dests)
        for k, h in H.items():
            symmetrize(h).mul_(2.0 / max(counts[k], 1))
        return {n: H[self.alias.get(n, n)] for n in self._names if owners[n] == world.rank}

    def remove(self):
        for h in self.handles:
            h.remove()
        self._window_inputs = []

