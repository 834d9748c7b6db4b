"""Block replay: a finished sub-block (attention once o_proj is quantized) is replayed from its last linear's
recorded input instead of recomputed."""
from __future__ import annotations

import contextlib
import logging

import torch

from .. import timing
from ..archs import ArchSpec

log = logging.getLogger("llmq")


class _Replay:
    """Replays the layer's finished sub-blocks (ArchSpec.blocks) instead of recomputing them.

    A block whose output is its last linear's output (checked on a full pass: `check`) needs only that linear's
    input once every linear in it is quantized: that input is recorded in the pass that accumulates the linear's
    H (all upstream linears are quantized by then, so it is final), and later passes run `block.forward` as
    `linear(recorded input)` — attention is computed once per layer instead of once per sequential group. The
    first replay of a window keeps the block's output instead of the input (same size or smaller)."""

    def __init__(self, layer, spec: ArchSpec, device):
        self.layer, self.spec, self.device = layer, spec, device
        self.ok: set[str] = set()  # blocks that return their last linear's output tensor
        self.inputs: dict[str, list] = {}  # block -> per window: the last linear's input, or the block's output
        self.structure: dict[str, tuple | None] = {}  # block -> the output tuple's shape (None: a bare tensor)
        self.window = 0
        self._active: list[str] = []

    @contextlib.contextmanager
    def check(self):
        """Within this context (a full forward pass), find which blocks return their last linear's output."""
        seen, handles = {}, []
        for blk, lin in self.spec.blocks:
            handles.append(self.layer.get_submodule(lin).register_forward_hook(
                lambda m, i, o, blk=blk: seen.__setitem__(blk, o)))  # fmt: skip
            handles.append(self.layer.get_submodule(blk).register_forward_hook(
                lambda m, i, o, blk=blk: self._note(blk, o, seen.get(blk))))  # fmt: skip
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _note(self, blk: str, out, lin_out) -> None:
        if isinstance(out, tuple) and out and out[0] is lin_out and all(o is None for o in out[1:]):
            self.ok.add(blk)
            self.structure[blk] = (len(out),)
        elif out is lin_out and lin_out is not None:
            self.ok.add(blk)
            self.structure[blk] = None
        else:
            self.ok.discard(blk)
            log.debug("%s does not return its last linear's output: recomputed in every pass", blk)

    def recordable(self, group: tuple[str, ...], done: set[str]) -> tuple[str, ...]:
        """The last linears of blocks that this group completes (every other linear of the block quantized)."""
        out = []
        for blk, lin in self.spec.blocks:
            others = [n for n in self.spec.linears if n.startswith(blk + ".") and n != lin] if blk != lin else []
            if blk in self.ok and lin in group and all(n in done for n in others):
                out.append(lin)
        return tuple(out)

    def start(self, recorded: dict[str, list]) -> None:
        """Replay, from now on, the blocks whose last linear's inputs were recorded (one per window)."""
        for blk, lin in self.spec.blocks:
            if recorded.get(lin):
                self.inputs[blk] = [("in", x) for x in recorded[lin]]
                mod = self.layer.get_submodule(blk)
                mod.forward = self._forward(blk, self.layer.get_submodule(lin))
                self._active.append(blk)

    def _forward(self, blk: str, lin):
        run = type(lin).forward.__get__(lin)  # the linear's own forward, even when the block is the linear

        def forward(*args, **kwargs):
            timing.count("replays")
            kind, t = self.inputs[blk][self.window]
            if kind == "in":
                with torch.no_grad():
                    t = run(t.to(self.device)).to(t.device)
                self.inputs[blk][self.window] = ("out", t)
            t = t.to(self.device)
            return t if self.structure[blk] is None else (t,) + (None,) * (self.structure[blk][0] - 1)

        return forward

    def stop(self) -> None:
        for blk in self._active:
            del self.layer.get_submodule(blk).forward
        self._active, self.inputs = [], {}

