"""One conversion on many processes: torch.distributed, launched by `torchrun` (docs/SCALE.md).

    torchrun --nproc-per-node 8 -m llmq quantize MODEL OUT --method gptq --device cuda

Every rank reads the same decoder layer and runs its share of the calibration windows through it (windows
r, r + W, r + 2W, ... of W ranks). Per sequential group of linears:

  1. each rank accumulates its partial Hessian sums (pipeline._HessianHooks);
  2. each linear gets an owner rank, chosen by the cost of its solve (~C³ + R·C² for W [R, C]; largest first to
     the least loaded rank: `owners`); the partial sums of every distinct H go to the owner(s) of its readers
     and are added there **in rank order** (`reduce`: point-to-point, rank 0's partial + rank 1's + ...), so the
     same command on the same world size gives the same bits; another world size adds other partial sums;
  3. owners run GPTQ on their linears, side by side;
  4. each quantized weight is broadcast from its owner (`share`: the packed codes and scales, not the dequantized
     matrix) and every rank installs its dequantization, so all ranks advance through the same quantized layer.

Rank 0 writes the checkpoint (one writer per file, the same atomic writes, manifest and resume as a single
process); on resume it reads the finished layers back and broadcasts them, so the output dir need only exist on
rank 0's machine. Each rank reads the source model itself.

Faults: every collective runs under the process group's timeout (`--dist-timeout`), and a lost peer (a rank killed,
a node gone) makes the waiting ranks fail with `WorldLost` instead of hanging; rank 0 then keeps the finished
layers for a resume, with any world size. A single process (no WORLD_SIZE in the environment) gets `World()`:
every method is the identity, nothing is communicated.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
from collections.abc import Callable, Iterable

import torch

from . import timing
from .errors import LlmqError

log = logging.getLogger("llmq")
DEFAULT_TIMEOUT_S = 1800.0  # a collective waits this long (an owner's solve of a 405B down_proj takes minutes)


class WorldLost(LlmqError):
    """A collective failed: another rank died, timed out or raised."""


class World:
    """The ranks of one conversion. World() is the single process."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None, backend: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):  # fmt: skip
        self.rank, self.size, self.backend, self.timeout_s = rank, size, backend, timeout_s
        self.device = device or torch.device("cpu")  # where communicated tensors live (the GPU under NCCL)
        self.bytes = 0  # bytes this rank has sent (broadcasts counted once per receiver)
        self._load = [0.0] * size  # solve cost given to each rank so far (breaks ties between groups)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def root(self) -> bool:
        return self.rank == 0

    # ---- setup ------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
        """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), or the
        single process. `device` "cuda" puts rank r on its node's GPU LOCAL_RANK, with NCCL; else gloo on the CPU."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = bool(device) and device.startswith("cuda")
        if cuda and device != "cuda":
            raise LlmqError(f"--device {device} under torchrun would put every rank on one GPU; pass --device cuda: "
                            "rank r then takes its node's GPU LOCAL_RANK")  # fmt: skip
        if cuda:
            if not torch.cuda.is_available():
                raise LlmqError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
            if torch.cuda.device_count() <= local:
                raise LlmqError(f"rank {rank}: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                                "GPU(s); launch at most one process per GPU (torchrun --nproc-per-node)")  # fmt: skip
            torch.cuda.set_device(local)
        backend = "nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        except (RuntimeError, ValueError) as e:
            raise WorldLost(f"rank {rank}: could not join the {size} ranks ({backend}, {_where()}): "
                            f"{_first_line(e)}") from None  # fmt: skip
        return cls(rank, size, torch.device("cuda", local) if cuda else torch.device("cpu"), backend, timeout_s)

    def local_device(self, device: str | None) -> str | None:
        """The device this rank computes on: rank r of a node takes GPU LOCAL_RANK for `--device cuda`."""
        if self.active and device == "cuda":
            return f"cuda:{self.device.index}"
        return device

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- work split -------------------------------------------------------------------------------
    def windows(self, n: int) -> list[int]:
        """The calibration windows (indices into n) this rank runs: r, r + W, ..."""
        if n < self.size:
            raise LlmqError(f"{n} calibration window(s) for {self.size} ranks: every rank needs at least one; "
                            "raise --nsamples or launch fewer processes")  # fmt: skip
        return list(range(self.rank, n, self.size))

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """An owner rank per job: largest cost first, each to the least loaded rank (the load carried over from
        earlier calls breaks ties, so single-linear groups rotate over the ranks). The same on every rank."""
        if not self.active:
            return dict.fromkeys(costs, 0)
        group = [0.0] * self.size
        out = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            r = min(range(self.size), key=lambda k: (group[k], self._load[k], k))
            out[name] = r
            group[r] += costs[name]
            self._load[r] += costs[name]
        return {n: out[n] for n in costs}

    # ---- collectives ------------------------------------------------------------------------------
    def reduce(self, parts: dict[str, torch.Tensor], dests: dict[str, Iterable[int]]) -> dict[str, torch.Tensor]:
        """Sum each key's partial tensor over the ranks, in rank order, onto every rank in dests[key]; returns the
        sums this rank received (other keys' partials are dropped). Every rank calls it with the same keys, shapes
        and dests. The first destination adds, then forwards the sum to the others."""
        if not self.active:
            return {k: v for k, v in parts.items() if 0 in dests[k]}
        out = {}
        with timing.phase("comm"), self._guard("reduce"):
            import torch.distributed as dist

            for key in list(parts):
                to = sorted(set(dests[key]))
                mine = parts.pop(key).to(self.device)
                if not to:
                    continue
                if self.rank == to[0]:  # total = p0 + p1 + ... in rank order, whoever adds
                    total, buf = mine, None
                    if self.rank != 0:
                        total = torch.empty_like(mine)
                        dist.recv(total, 0)
                    for src in range(1, self.size):
                        if src == self.rank:
                            total.add_(mine)
                            buf = mine  # free to receive into from now on
                            continue
                        if buf is None:
                            buf = torch.empty_like(total)
                        dist.recv(buf, src)
                        total.add_(buf)
                    del buf
                    for dst in to[1:]:
                        dist.send(total, dst)
                        self.bytes += _nbytes(total)
                    out[key] = total
                else:
                    dist.send(mine, to[0])
                    self.bytes += _nbytes(mine)
                    if self.rank in to:  # a later destination: the sum arrives in the partial's buffer
                        dist.recv(mine, to[0])
                        out[key] = mine
                del mine
        return out

    def share(self, objs: dict[str, object], owners: dict[str, int]) -> dict[str, object]:
        """Every rank gets every job's result: objs holds this rank's own results (owners[name] == rank); each is
        broadcast from its owner, in owners' order. Tensors inside travel pickled, on the CPU."""
        if not self.active:
            return objs
        import torch.distributed as dist

        out = {}
        with timing.phase("comm"), self._guard("share"):
            for name, r in owners.items():
                box = [objs[name] if r == self.rank else None]
                if r == self.rank:
                    self.bytes += _payload(box[0]) * (self.size - 1)
                dist.broadcast_object_list(box, src=r, device=self._object_device)
                out[name] = box[0]
        return out

    def from_root(self, fn: Callable[[], object]) -> object:
        """fn() on rank 0, its result (or its LlmqError, raised on every rank) broadcast to all."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.root:
            try:
                box[0] = ("ok", fn())
            except LlmqError as e:
                box[0] = ("error", str(e))
        with self._guard("broadcast"):
            dist.broadcast_object_list(box, src=0, device=self._object_device)
        kind, value = box[0]
        if kind == "error":
            raise LlmqError(value)
        return value

    def gather(self, obj: object) -> list:
        """obj from every rank, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        with timing.phase("comm"), self._guard("gather"):
            dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64; for reports, not for weights)."""
        if not self.active:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        with timing.phase("comm"), self._guard("all_reduce"):
            dist.all_reduce(t)
        return t.tolist()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over the ranks (every rank gets it; the same on every rank)."""
        if not self.active:
            return t
        import torch.distributed as dist

        home = t.device
        t = t.to(self.device).contiguous()
        with timing.phase("comm"), self._guard("all_reduce"):
            dist.all_reduce(t)
        self.bytes += _nbytes(t)
        return t.to(home)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            with self._guard("barrier"):
                dist.barrier()

    @property
    def _object_device(self):
        return self.device if self.backend == "nccl" else None

    @contextlib.contextmanager
    def _guard(self, what: str):
        """A failed collective (a peer gone, the timeout) as WorldLost, naming this rank and what to do."""
        try:
            yield
        except LlmqError:
            raise
        except RuntimeError as e:  # torch.distributed's errors (DistBackendError included)
            raise WorldLost(f"rank {self.rank} of {self.size}: {what} failed ({_first_line(e)}): another rank died, "
                            f"raised or did not answer within --dist-timeout {self.timeout_s:g}s. Finished layers are "
                            "kept; rerun the same command (any number of processes) to resume") from None  # fmt: skip


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _where() -> str:
    return f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')} MASTER_PORT={os.environ.get('MASTER_PORT', '?')}"


def _payload(obj) -> int:
    """Bytes of a shared result: a quantized weight's stored bytes (pickling adds a few hundred), else its pickle."""
    nbytes = getattr(obj, "nbytes", None)
    return nbytes() if callable(nbytes) else len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
