"""Quantize a whole model, decoder layer by decoder layer.

RTN needs no data: each linear is quantized from its own weight. GPTQ runs the calibration windows
through the model one decoder layer at a time:

  1. capture the inputs of layer 0 (and the arguments the layers need: masks, position embeddings);
  2. for each layer, for each sequential group of linears (archs.py): forward pre-hooks accumulate
     H = 2XXᵀ/n (fp32) of each distinct input (q/k/v share one) while the layer runs on every window —
     stopping before the group's linears run — then each linear is quantized and its weight replaced by the
     dequantized one, so later groups see the quantized layer. A finished block (attention once o_proj is
     quantized, the MLP once down_proj is) is replayed from its last linear's recorded input, not recomputed:
     a Llama layer costs about one full forward pass instead of five;
  3. the last pass gives the next layer's inputs.

With GPTQConfig(inputs="fp") the activations stay those of the full-precision model instead: one pass of
the fp layer accumulates every linear's H and yields the next layer's inputs; then the layer is quantized.

The active layer may live on a GPU (`device`) while the model stays on the CPU; activations (and the replayed
blocks' recorded inputs) live on `act_device`. Per layer it reports the time of each phase (timing.py), the
number of passes, and the relative output error ‖Y_q − Y‖/‖Y‖ on the first ERR_TOKENS tokens.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from . import timing
from .algorithms.gptq import gptq, solve_cost
from .algorithms.rtn import rtn
from .archs import ArchSpec, arch_for, decoder_layers, quantizable_names, weight_of
from .config import GPTQConfig, QuantPlan, QuantScheme
from .distributed import World
from .dtypes import all_finite
from .errors import LlmqError
from .lazy import trim_heap
from .qtensor import QuantizedWeight, RowSplitWeight
from .recipes import resolve_shapes

log = logging.getLogger("llmq")
ERR_TOKENS = 2048  # the relative output error is measured on the first windows covering this many tokens


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float | None = None
    modules: dict[str, float] = field(default_factory=dict)  # name -> bits per weight
    phases: dict[str, float] = field(default_factory=dict)  # timing.PHASES -> seconds (exclusive)
    passes: int = 0  # forward passes of the layer over the calibration windows (stopped early or whole)
    comm_bytes: int = 0  # bytes sent between ranks for this layer, all ranks together (distributed.py)
    replays: int = 0  # block forwards replayed from recorded inputs instead of recomputed (_Replay)

    def timed(self, ph: timing.Phases) -> LayerReport:
        """This report with the time and phases measured around the layer (read and write included)."""
        return replace(self, seconds=ph.total, phases=ph.report(), passes=ph.counts.get("passes", 0),
                       replays=ph.counts.get("replays", 0))  # fmt: skip


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, plan: QuantPlan, name: str,
                    cfg: GPTQConfig | None = None) -> QuantizedWeight | RowSplitWeight:  # fmt: skip
    """One linear by the plan: GPTQ with H, or RTN when H is None; a linear the plan splits by output row is
    quantized piece by piece (each piece's rows with its own scheme, the same H)."""
    cfg = cfg or GPTQConfig()
    split = plan.row_splits.get(name)
    if split is not None:  # every piece needs the whole H
        return RowSplitWeight.quantize(W, split, functools.partial(_quantize_rows, H=H, cfg=cfg, name=name))
    if H is None:
        return rtn(W, plan.scheme_for(name))
    handed = [H]
    del H
    return gptq(W, handed.pop(), plan.scheme_for(name), cfg, name)  # our reference handed over: gptq frees H early


def _quantize_rows(Wp: torch.Tensor, scheme: QuantScheme, H: torch.Tensor | None, cfg: GPTQConfig, name: str):
    return rtn(Wp, scheme) if H is None else gptq(Wp, H, scheme, cfg, name)


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """[out, in] of every decoder linear llmq quantizes."""
    spec = arch_for(model.config)
    return {n: tuple(weight_of(model.get_submodule(n), spec).shape) for n in quantizable_names(model, spec)}


def solve_owners(mods: dict[str, torch.nn.Module], spec: ArchSpec, world: World, gptq: bool = True) -> dict[str, int]:
    """The rank that quantizes each of `mods`: by the cost of the solve, C³ + R·C² for GPTQ of W [R, C] (the
    Cholesky and the column loop), R·C for RTN."""
    shapes = {rel: weight_of(m, spec).shape for rel, m in mods.items()}
    return world.owners({rel: solve_cost(R, C) if gptq else float(R * C) for rel, (R, C) in shapes.items()})


def share_layer(layer, i: int, spec: ArchSpec, mine: dict[str, QuantizedWeight], owners: dict[str, int],
                world: World, install: bool = True) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Every linear of `owners` from its owner rank to all (in owners' order). With `install`, the ones another rank
    quantized are installed dequantized here (the owner installed its own), so every rank goes on with the same
    layer."""
    if not world.active:
        return mine
    got = world.share(mine, {f"{spec.layers}.{i}.{rel}": r for rel, r in owners.items()})  # parts on the CPU
    if install:
        install_dequantized(layer, i, spec, got, rels=[r for r in owners if f"{spec.layers}.{i}.{r}" not in mine])
    return got


def rtn_model(model, plan: QuantPlan, quiet: bool = False) -> dict[str, QuantizedWeight]:
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    out: dict[str, QuantizedWeight] = {}
    for i in tqdm(range(len(layers)), desc="quantize (rtn)", unit="layer", disable=quiet):
        out |= rtn_layer(layers[i], i, spec, plan)
    return out


# ---- GPTQ ---------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""


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


def check_finite(W: torch.Tensor, name: str) -> None:
    if not all_finite(W):
        bad = (~torch.isfinite(W)).sum().item()
        raise LlmqError(f"{name}.weight has {bad} NaN/Inf value(s); the source checkpoint is damaged there. Repair "
                        "or re-download the model (llmq will not quantize non-finite weights)")  # fmt: skip


def rtn_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan, world: World | None = None) -> dict[str, QuantizedWeight]:
    """RTN of every linear of the layer; with a world, each rank quantizes its share and all get every result."""
    world = world or World()
    mods = {rel: layer.get_submodule(rel) for rel in spec.linears}
    owners = solve_owners(mods, spec, world, gptq=False)
    out = {}
    for rel, mod in mods.items():
        name = f"{spec.layers}.{i}.{rel}"
        W = weight_of(mod, spec)
        check_finite(W, name)
        if owners[rel] == world.rank:
            out[name] = quantize_linear(W, None, plan, name)
    return share_layer(layer, i, spec, out, owners, world, install=False)  # RTN: nothing runs through the layer


def install_dequantized(layer, i: int, spec: ArchSpec, qweights: dict[str, QuantizedWeight],
                        rels: list[str] | None = None) -> None:  # fmt: skip
    """Give the layer's linears (`rels`, default all) their dequantized weights (what the next layer will see)."""
    with torch.no_grad():
        for rel in spec.linears if rels is None else rels:
            mod = layer.get_submodule(rel)
            Wq = qweights[f"{spec.layers}.{i}.{rel}"].dequantize(mod.weight.dtype).to(mod.weight.device)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)


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


@torch.no_grad()
def gptq_layer(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig, acts: Activations) -> tuple[dict, LayerReport]:
    """Quantize one decoder layer with GPTQ, group by group; then advance the activations through it.
    cfg.inputs == "fp": see gptq_layer_fp.

    Passes: the first group's pass stops at its linears' input (the first ERR_TOKENS tokens run the fp layer
    whole: the error reference); each later group's pass stops where that group's input is complete, with the
    finished blocks replayed (_Replay); the last pass gives the next layer's inputs. With cfg.sequential=False,
    one pass accumulates every H from the unquantized layer (the original GPTQ code's way)."""
    if cfg.inputs == "fp":
        return gptq_layer_fp(layer, i, spec, plan, cfg, acts)
    t0 = time.perf_counter()
    home = next(layer.parameters()).device
    layer.to(acts.device)
    out: dict[str, QuantizedWeight] = {}
    ref_out: list = []
    replay = _Replay(layer, spec, acts.device)
    groups = spec.sequential if cfg.sequential else (spec.linears,)
    done: set[str] = set()
    try:
        for gi, group in enumerate(groups):
            mods = {rel: layer.get_submodule(rel) for rel in group}
            for rel, mod in mods.items():
                check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
            record = replay.recordable(group, done) if cfg.replay else ()
            hooks = _HessianHooks(mods, record=record, record_device=acts.act_device)
            try:
                _pass(layer, acts, hooks, replay, full=error_windows(acts) if gi == 0 else 0, ref=ref_out)
            finally:
                hooks.remove()
            if gi == 0:  # which blocks replay was seen on rank 0's whole windows (window 0 is its own): the other
                # ranks, with no error window, would recompute every block in every pass
                replay.ok, replay.structure = acts.world.from_root(lambda: (replay.ok, replay.structure))
            owners = solve_owners(mods, spec, acts.world)
            Hs = hooks.hessians(acts.world, owners)
            recorded = hooks.recorded
            with timing.phase("forward"):
                trim_heap(collect=False)  # the pass's freed activations
            del hooks  # Hs is now the only reference: each H is freed as soon as its module is done
            out |= share_layer(layer, i, spec, _quantize_modules(i, spec, plan, cfg, mods, Hs), owners, acts.world)
            with timing.phase("params"):
                trim_heap(collect=False)  # the group's freed H and GPTQ temporaries back to the OS
            done |= set(group)
            replay.start(recorded)
        err = advance(layer, acts, ref_out, replay)
    finally:
        replay.stop()
    with timing.phase("forward"):
        trim_heap()
    layer.to(home)
    return out, LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()})


def _quantize_modules(i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig, mods: dict,
                      Hs: dict) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ each module from its H (popped, so each is freed when done); install the dequantized weight."""
    out = {}
    for rel in list(Hs):
        name = f"{spec.layers}.{i}.{rel}"
        mod = mods[rel]
        qw = quantize_linear(weight_of(mod, spec), Hs.pop(rel), plan, name, cfg)
        with timing.phase("params"):
            Wq = qw.dequantize(mod.weight.dtype).to(mod.weight.device)
            mod.weight.copy_(Wq.t() if spec.transposed else Wq)
        out[name] = qw
    return out


@torch.no_grad()
def gptq_layer_fp(layer, i: int, spec: ArchSpec, plan: QuantPlan, cfg: GPTQConfig,
                  acts: Activations) -> tuple[dict, LayerReport]:
    """GPTQ with every linear's H from full-precision inputs: one pass of the fp layer over every window
    accumulates all H and gives the next layer's (fp) inputs; then every linear is quantized. `acts`
    holds the fp model's activations, so on resume a finished layer is advanced with its fp weights.
    Unlike the sequential path, all of the layer's distinct H are alive at once (4 for a Llama layer)."""
    t0 = time.perf_counter()
    home = next(layer.parameters()).device
    layer.to(acts.device)
    mods = {rel: layer.get_submodule(rel) for rel in spec.linears}
    for rel, mod in mods.items():
        check_finite(weight_of(mod, spec), f"{spec.layers}.{i}.{rel}")
    hooks = _HessianHooks(mods, stop=False)
    # the first windows' inputs, for the error report (their fp outputs replace them in acts)
    sample = replace(acts, inps=acts.inps[: error_windows(acts)])
    timing.count("passes")
    try:
        for k, x in enumerate(acts.inps):
            hooks.new_window()
            with timing.phase("forward"):
                acts.inps[k] = _run_layer(layer, x, acts.args, acts.kwargs, acts.device).to(acts.act_device)
    finally:
        hooks.remove()
    owners = solve_owners(mods, spec, acts.world)
    Hs = hooks.hessians(acts.world, owners)
    del hooks
    out = share_layer(layer, i, spec, _quantize_modules(i, spec, plan, cfg, mods, Hs), owners, acts.world)
    err = advance(layer, sample, ref_out=acts.inps[: len(sample.inps)], phase="error")  # sample.inps: quantized outputs
    with timing.phase("forward"):
        trim_heap()
    layer.to(home)
    return out, LayerReport(i, time.perf_counter() - t0, err, {n: q.bits_per_weight() for n, q in out.items()})


def log_layer(rep: LayerReport, bar, quiet: bool) -> None:
    err = f", relative output error {rep.rel_error:.4f}" if rep.rel_error is not None else ""
    parts = [f"{p} {s:.1f}" for p, s in rep.phases.items() if s >= 0.05]
    inner = "; ".join(x for x in (f"{rep.passes} passes" if rep.passes else "", ", ".join(parts)) if x)
    msg = f"layer {rep.index}: {rep.seconds:.1f}s{f' ({inner})' if inner else ''}{err}"
    log.debug(msg) if quiet else bar.write(msg)


@torch.no_grad()
def gptq_model(model, plan: QuantPlan, calib: torch.Tensor, cfg: GPTQConfig | None = None, device=None,
               act_device="cpu", quiet: bool = False, reports: list | None = None) -> dict[str, QuantizedWeight]:  # fmt: skip
    """GPTQ over every decoder layer of an in-memory model. Its linears end up holding their dequantized
    weights. (`llmq quantize` streams layers from disk instead: convert.py.)"""
    cfg = cfg or GPTQConfig()
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    acts = start_activations(model, spec, calib, device or next(model.parameters()).device, act_device)
    out: dict[str, QuantizedWeight] = {}
    bar = tqdm(range(len(layers)), desc="quantize (gptq)", unit="layer", disable=quiet)
    for i in bar:
        with timing.Phases(acts.device) as ph:
            q, rep = gptq_layer(layers[i], i, spec, plan, cfg, acts)
        rep = rep.timed(ph)
        out |= q
        if reports is not None:
            reports.append(rep)
        log_layer(rep, bar, quiet)
    return out


def quantize(model, scheme: QuantScheme | QuantPlan, calib: torch.Tensor | None = None, method: str = "rtn",
             gptq: GPTQConfig | None = None, quiet: bool = True, **kw) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Quantize `model`'s decoder linears; returns {module name: QuantizedWeight}.

    method="rtn": calibration-free, the model is unchanged. method="gptq": `calib` is [N, L] token ids;
    the model's linears are left holding their dequantized (fake-quantized) weights."""
    plan = scheme if isinstance(scheme, QuantPlan) else QuantPlan(scheme)
    plan = resolve_shapes(plan, linear_shapes(model))[0]  # llama.cpp's fallback for block formats
    if method == "rtn":
        return rtn_model(model, plan, quiet)
    if method == "gptq":
        return gptq_model(model, plan, calib, gptq, quiet=quiet, **kw)
    raise LlmqError(f"method={method!r} is not supported; use 'rtn' or 'gptq'")
