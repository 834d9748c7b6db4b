"""Where a conversion's time goes: exclusive seconds per named phase, for summary.json and the progress line.

    with Phases(device) as ph:          # one per decoder layer
        with phase("forward"):
            ...                          # a forward hook inside may open phase("hessian"):
                                         # forward's clock pauses meanwhile, so phases never double-count
    ph.seconds  -> {"forward": 7.9, "hessian": 2.8, ...};  ph.total -> the context's own seconds

`phase()` finds the active `Phases` through a context variable, so the pure functions (gptq, the clip search)
time themselves without a timer argument, and cost nothing when none is active. On a GPU every boundary
synchronises the device (once per phase change, never per column), else the clock would measure kernel launches.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict
from typing import Self

import torch

# the phases a layer reports, in the order the progress line prints them ("comm": between the ranks of a distributed
# conversion, waiting for them included: distributed.py)
PHASES = ("read", "forward", "hessian", "cholesky", "column_loop", "clip_search", "params", "outliers", "refine",
          "error", "comm", "write")  # fmt: skip
_ACTIVE: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("llmq_phases", default=None)


class Phases:
    def __init__(self, device: torch.device | str | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._sync = torch.device(device).type == "cuda" if device is not None else False
        self._stack: list[str] = []
        self._t = 0.0
        self._token = None
        self.total = 0.0  # seconds from entering to leaving the context

    def __enter__(self) -> Self:
        self._token = _ACTIVE.set(self)
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.total = self._now() - self._start
        _ACTIVE.reset(self._token)

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _switch(self) -> None:
        """Charge the time since the last boundary to the innermost open phase."""
        t = self._now()
        if self._stack:
            self.seconds[self._stack[-1]] += t - self._t
        self._t = t

    @contextlib.contextmanager
    def phase(self, name: str):
        self._switch()
        self._stack.append(name)
        self.counts[name] += 1
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def report(self) -> dict[str, float]:
        """Seconds per phase, rounded, in PHASES order (phases that never ran are left out)."""
        known = [p for p in PHASES if p in self.seconds] + sorted(set(self.seconds) - set(PHASES))
        return {p: round(self.seconds[p], 3) for p in known}


@contextlib.contextmanager
def phase(name: str):
    """Time the block as `name` in the active Phases (nothing when none is active)."""
    ph = _ACTIVE.get()
    if ph is None:
        yield
    else:
        with ph.phase(name):
            yield


def count(name: str, n: int = 1) -> None:
    ph = _ACTIVE.get()
    if ph is not None:
        ph.count(name, n)
