"""`llmq quantize`: source model -> quantized checkpoint dir, streamed layer by layer, resumable.

A `ConvertRequest` says what to do (the CLI builds one from its flags; Python callers build it directly). Flow:
check the arguments and read the calibration text -> a placeholder config.json that refuses to load -> open the
source lazily (lazy.py) -> [calibration windows; mixed precision: the plan (mixed.py); GPTQ: capture
layer-0 inputs] -> for each decoder layer: read it, quantize it, write its tensors to a part file, record it in
the manifest (progress.py), release it -> write the embeddings / norm / head -> summary.json, model card -> index
-> config.json (last). A failure keeps the finished layers: rerunning the same request resumes; nothing is ever
left that loads as a complete model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import codec, moe, recipes, sources, timing
from . import mixed as mixed_precision
from .archs import arch_for, decoder_layers, describe, describe_lines, routers_of
from .calibration import calibration_windows, check_enough_text
from .checkpoint import DEFAULT_MAX_SHARD, CheckpointWriter, atomic_write_json, atomic_write_text
from .config import CalibConfig, GPTQConfig, MixedConfig, QuantPlan, QuantScheme
from .data import load_text
from .distributed import DEFAULT_TIMEOUT_S, World
from .dtypes import DTYPES
from .errors import LlmqError
from .lazy import LazyModel
from .pipeline import (
    LayerReport,
    advance,
    gptq_layer,
    install_dequantized,
    linear_shapes,
    log_layer,
    refine,
    rtn_layer,
    start_activations,
)
from .progress import Progress
from .record import CheckpointRecord, ModuleRecord, complete_config, placeholder_config
from .rotation import Rotation, RotationConfig
from .summary import human_bytes, machine, model_card, peak_rss_mb, versions
from .version import __version__

log = logging.getLogger("llmq")
BIG_TENSOR = 64 << 20  # bytes: embeddings / heads above this get a part file of their own
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class ConvertRequest:
    """One conversion. `model`: a Hugging Face model dir, hub id or .gguf file; `out`: the output dir (new, empty,
    an interrupted conversion of the same request, or with `overwrite` an earlier llmq output).

    gptq: GPTQ options (method "gptq"; default GPTQConfig()). calib: calibration windows, used by GPTQ and by
    mixed precision (default CalibConfig()). mixed: a scheme per linear or per output row to a bits-per-weight
    budget instead of `scheme` everywhere; the candidates take `scheme`'s sym / clip_search / scale_dtype.
    gguf_recipe: llama.cpp's mix ("Q4_K_M", llmq/recipes.py): the block type llama-quantize gives each tensor
    (with calibration, as with an importance matrix), instead of `scheme`; its clip_search is kept. Block formats that
    do not fit a linear's rows get llama.cpp's fallback type.
    dtype: storage dtype of the tensors left in full precision. device: where the active layer runs
    (offload_activations keeps the calibration activations on the CPU meanwhile). rotate: an orthogonal rotation
    fused into the weights as they are read, before anything else (rotation.py); the output is a plain model of the
    same architecture (a tied head untied). dist_timeout: seconds a rank of a distributed conversion (torchrun,
    distributed.py) waits for the others before it gives up.
    """

    model: str
    out: Path
    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    gptq: GPTQConfig | None = None
    calib: CalibConfig | None = None
    mixed: MixedConfig | None = None
    gguf_recipe: str | None = None
    dtype: str = "float16"
    max_shard_size: int = DEFAULT_MAX_SHARD
    device: str | None = None
    offload_activations: bool = False
    overwrite: bool = False
    quiet: bool = False
    rotate: RotationConfig = field(default_factory=RotationConfig)
    dist_timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LlmqError(f"method={self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise LlmqError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        object.__setattr__(self, "out", Path(self.out))
        if self.method == "gptq" and self.gptq is None:
            object.__setattr__(self, "gptq", GPTQConfig())
        if self.method != "gptq":
            object.__setattr__(self, "gptq", None)
        if self.gguf_recipe is not None:
            recipes.check_mix(self.gguf_recipe)
            if self.mixed is not None:
                raise LlmqError("a GGUF recipe fixes every tensor's type; it cannot be combined with mixed precision")
        if (self.method == "gptq" or self.mixed is not None) and self.calib is None:
            object.__setattr__(self, "calib", CalibConfig())
        if self.max_shard_size < 1024:
            raise LlmqError(f"--max-shard-size {self.max_shard_size} bytes: give a size of at least 1KB with its unit, "
                            "e.g. 2GB (the default) or 500MB")  # fmt: skip

    def candidate_base(self) -> dict:
        """The fields mixed precision's candidates take from `scheme` (a candidate's name leaves them out)."""
        return {"clip_search": self.scheme.clip_search, "scale_dtype": self.scheme.scale_dtype, "sym": self.scheme.sym}

    def fingerprint_args(self, src) -> dict:
        """Everything that changes the output: a resumed conversion must match this exactly."""
        calib = dataclasses.asdict(self.calib) if self.calib else None
        if calib and calib["source"] and Path(calib["source"]).exists():
            calib["source"] = str(Path(calib["source"]).resolve())
        m = self.mixed
        return {"model": str(src), "method": self.method, "scheme": self.scheme.to_dict(),
                "gptq": _gptq_args(self.gptq), "calibration": calib,
                "dtype": self.dtype, "max_shard_size": self.max_shard_size, "device": self.device, "llmq": __version__,
                **({"target_bpw": m.target_bpw, "candidates": list(m.candidates)} if m else {}),
                **({"granularity": "row"} if m and m.granularity == "row" else {}),
                **({"gguf_recipe": self.gguf_recipe} if self.gguf_recipe else {}),
                **({"rotate": dataclasses.asdict(self.rotate)} if self.rotate.active else {})}  # fmt: skip


def _gptq_args(cfg: GPTQConfig | None) -> dict | None:
    """GPTQ options that change the output: `replay` and `experts_per_pass` do not (they trade memory for time), so a
    conversion that ran out of memory resumes with --no-gptq-replay or fewer --experts-per-pass."""
    return None if cfg is None else {k: v for k, v in dataclasses.asdict(cfg).items()
                                     if k not in ("replay", "experts_per_pass")}  # fmt: skip


def convert(req: ConvertRequest, on_layer_done: Callable[[int], None] | None = None) -> dict:
    """Run the conversion; returns the summary (also written to OUT/summary.json). `on_layer_done(i)` is called
    once decoder layer i is on disk and recorded (tests use it to interrupt a conversion there)."""
    if req.device and req.device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError(f"--device {req.device}: CUDA is not available on this machine; use --device cpu")
    if req.dist_timeout <= 0:
        raise LlmqError(f"--dist-timeout {req.dist_timeout:g}: give the seconds a rank waits for the others (> 0)")
    src = sources.resolve(req.model)
    world = World.from_env(req.device, req.dist_timeout)  # torchrun's ranks, or the single process
    if not world.root:  # rank 0 reports; the others say only what goes wrong
        req = dataclasses.replace(req, quiet=True)
        logging.getLogger("llmq").setLevel(logging.ERROR)
    try:
        if req.calib is not None:
            world.windows(req.calib.nsamples)  # every rank needs a window: said now, not after loading the model
        with contextlib.ExitStack() as parsing:  # a .gguf header parsed once for config, tokenizer and weights
            parsing.enter_context(sources.gguf_parsed_once(src))
            return _convert(req, src, on_layer_done, parsing, world)
    finally:
        world.close()


def _open_output(req: ConvertRequest, src, config) -> Progress:
    """The output dir, new or resumed, with a placeholder config.json that refuses to load until the end."""
    prog = Progress.open(req.out, req.fingerprint_args(src), req.overwrite)
    try:
        atomic_write_json(req.out / "config.json", placeholder_config(config.to_dict()))
    except BaseException as e:
        _on_failure(req.out, prog, e)
        raise
    return prog


def _convert(req: ConvertRequest, src: sources.Source, on_layer_done, parsing: contextlib.ExitStack,
             world: World) -> dict:  # fmt: skip
    # bad input first, before anything slow (a .gguf's config alone takes seconds, its model minutes): the calibration
    # text (exists, decodes, not empty), the window length against the model's positions, then the architecture
    if req.calib is not None:
        sources.check_seqlen(req.calib.seqlen, sources.max_positions(src))
    text = load_text(req.calib.source, req.calib.split) if req.calib is not None else None
    if text is not None:
        check_enough_text(text[0], req.calib)
    config = sources.load_config(src)
    spec = arch_for(config)
    if not req.quiet and world.root:  # what discovery found, before anything slow
        print("\n".join(describe_lines(describe(config, spec))), flush=True)
    rotation = Rotation(req.rotate, config) if req.rotate.active else None  # an unsupported model: refused here
    if rotation is not None and req.method == "rtn":
        log.warning("--rotate with RTN: on SmolLM2 this collapsed the model (int3 perplexity 21093 against 147 "
                    "unrotated, benchmarks/results/rotation.md); use --method gptq with a rotation")  # fmt: skip
    if req.calib is not None:
        sources.check_seqlen(req.calib.seqlen, sources.config_positions(config))
    out = req.out
    # rank 0 owns the output dir (it need not be shared): the others learn which layers are finished from it
    prog = world.from_root(lambda: _open_output(req, src, config))
    t0 = time.perf_counter()
    try:
        tokenizer, why = sources.load_tokenizer(src)
        if tokenizer is None:
            log.warning("no tokenizer saved: %s", why)
        calib = calibration_windows(req.calib, tokenizer, text) if req.calib is not None else None
        lazy = LazyModel(src, config, spec, rotation=rotation)
        parsing.close()  # every read of the source's header is done
        plan, alloc, acts = _prepare(req, lazy, calib, world)
        t_load = time.perf_counter() - t0
        writer = CheckpointWriter(out, req.max_shard_size, first_part=prog.next_part) if world.root else None
        n_layers = len(decoder_layers(lazy.model, spec))
        bar = tqdm(range(n_layers), desc=f"quantize ({req.method})", unit="layer", disable=req.quiet)
        mine: dict[str, float] = {}  # this rank's seconds per phase (each rank's in summary.json: the balance)
        replays = 0
        for i in bar:
            if i in prog.layers:  # finished before an interruption: only the activations move on
                _skip_layer(req, lazy, i, plan, acts, prog, world)
                continue
            rep = _convert_layer(req, lazy, i, plan, acts, writer, prog, world)
            mine = {p: round(mine.get(p, 0.0) + rep.phases.get(p, 0.0), 3) for p in mine | rep.phases}
            replays += rep.replays
            log_layer(rep, bar, req.quiet)
            if on_layer_done is not None:
                on_layer_done(i)
        ranks = world.gather({"rank": world.rank, "windows": len(acts.inps) if acts else 0,
                              "peak_rss_mb": round(peak_rss_mb(), 1), "comm_bytes": world.bytes, "phases_s": mine,
                              "replays": replays})  # fmt: skip
        if not world.root:
            world.barrier()  # until rank 0 has written everything: a failure there fails every rank
            return {}
        modules = prog.modules()
        _write_rest(req, lazy, writer, modules, tokenizer)
        method = {"name": req.method, **({"gptq": dataclasses.asdict(req.gptq), "calibration": prog.args["calibration"]}
                                         if req.gptq else {}),
                  **({"mixed": mixed_precision.summary(alloc)} if alloc else {}),
                  **({"gguf_recipe": req.gguf_recipe} if req.gguf_recipe else {}),
                  **({"rotation": rotation.record() | {"untied_head": lazy.head_from_embedding}} if rotation else {})}  # fmt: skip
        not_converted = [n for n in codec.linear_names(lazy.model) if n not in modules] + routers_of(lazy.model, spec)
        record = CheckpointRecord.build(plan, modules, not_converted, method)
        cfg = record.model_config(lazy.model.config.to_dict(), req.dtype)
        writer.flush()
        summary = _summary(req, src, plan, alloc, method, prog, lazy.streamed, modules, t_load)
        summary["file_bytes"] = sum((out / p).stat().st_size for p in writer.written_all(out))
        summary["total_time_s"] = round(time.perf_counter() - t0, 2)
        summary["quantize_time_s"] = round(sum(r["seconds"] for r in summary["layers"] if r), 2)
        summary["phases_s"] = _phase_totals(summary["layers"])
        summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if world.active:
            summary["distributed"] = {"world_size": world.size, "backend": world.backend, "ranks": ranks}
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "README.md", model_card(summary))
        writer.finish(cfg)  # shards renamed, index, then config.json last
        prog.finish()
        world.barrier()
    except BaseException as e:
        if world.root:
            _on_failure(out, prog, e)
        raise
    if not req.quiet:
        print(f"quantized {len(modules)} linears of {src} with {req.method} {plan.default.describe()} in "
              f"{summary['total_time_s']:.1f}s: {summary['bits_per_weight']:.3f} bits per weight, "
              f"{human_bytes(summary['quantized_bytes'])} quantized; {human_bytes(summary['file_bytes'])} on disk "
              f"in {out}")  # fmt: skip
    return summary


def shaped_plan(req: ConvertRequest, plan: QuantPlan, config, shapes: dict[str, tuple[int, int]],
                n_layers: int) -> QuantPlan:  # fmt: skip
    """`plan` (the request's scheme, or mixed precision's allocation) with a GGUF recipe's type per linear and
    llama.cpp's fallback where a block does not fit: from the shapes alone, so `--for` can check it before any work."""
    if req.gguf_recipe:
        heads = getattr(config, "num_attention_heads", 1)
        gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
        tensors = recipes.gguf_tensors(config.model_type, shapes, n_layers)
        plan = recipes.recipe_plan(req.gguf_recipe, tensors, n_layers, gqa, calibrated=req.calib is not None,
                                   clip_search=req.scheme.clip_search, n_expert=moe.expert_count(config))  # fmt: skip
    return recipes.resolve_shapes(plan, shapes)[0]


def _prepare(req: ConvertRequest, lazy: LazyModel, calib, world: World):
    """Before the layer loop: (plan, mixed-precision allocation or None, GPTQ activations or None)."""
    plan, alloc, acts = QuantPlan(req.scheme), None, None
    if req.mixed or req.gptq:
        lazy.load_rest(head=req.mixed is not None)  # embeddings for calibration (the whole model for sensitivity)
    if req.mixed:
        plan, alloc = mixed_precision.conversion_plan(lazy, calib, req.mixed, req.candidate_base(), req.method,
                                                      req.gptq, req.out, req.quiet, world)  # fmt: skip
    n_layers = len(decoder_layers(lazy.model, lazy.spec))
    plan = shaped_plan(req, plan, lazy.model.config, linear_shapes(lazy.model), n_layers)
    if req.gptq:
        device = world.local_device(req.device) or "cpu"
        acts = start_activations(lazy.model, lazy.spec, calib, device, "cpu" if req.offload_activations else device,
                                 world)  # fmt: skip
    lazy.release_rest()  # not needed again until they are written
    return plan, alloc, acts


def _convert_layer(req: ConvertRequest, lazy: LazyModel, i: int, plan: QuantPlan, acts,
                   writer: CheckpointWriter | None, prog: Progress, world: World) -> LayerReport:  # fmt: skip
    """Quantize decoder layer i, write its part file(s), record it in the manifest (rank 0), release it."""
    spec = lazy.spec
    sent = world.bytes
    with timing.Phases(acts.device if acts else None) as ph:
        with timing.phase("read"):
            layer = lazy.layer(i)
        if req.gptq:
            q, rep = gptq_layer(layer, i, spec, plan, req.gptq, acts)
        else:
            with timing.phase("params"):
                q = rtn_layer(layer, i, spec, plan, world)
            rep = LayerReport(i, 0.0, None, {n: w.bits_per_weight() for n, w in q.items()})
        if writer is not None:
            with timing.phase("write"):
                state = {f"{spec.layers}.{i}.{k}": v for k, v in layer.state_dict().items()}
                first = len(writer.written)
                writer.add(codec.stored_tensors(state, q, DTYPES[req.dtype]))
                writer.flush()
                del state
        with timing.phase("read"):  # the source layer's memory back (counted with reading it)
            lazy.release(i)
    rep = replace(rep.timed(ph), comm_bytes=int(world.sum([float(world.bytes - sent)])[0]))
    if writer is not None:
        prog.layer_done(i, writer.written[first:], writer.next_part, {n: ModuleRecord.of(n, w) for n, w in q.items()},
                        dataclasses.asdict(rep))  # fmt: skip
    return rep


def _skip_layer(req: ConvertRequest, lazy: LazyModel, i: int, plan: QuantPlan, acts, prog: Progress,
                world: World) -> None:  # fmt: skip
    """A layer finished before an interruption: GPTQ's activations still have to pass it, through the quantized
    layer as it was written (or the fp one, with inputs="fp"); rank 0 reads it back for every rank."""
    layer = lazy.layer(i)
    if req.gptq:
        if req.gptq.refine and req.gptq.refine_target == "fp":  # the fp model's prefixes, through the fp layer
            refine.advance_fp(layer, acts, req.gptq)
        if req.gptq.inputs == "quantized":
            q = world.from_root(lambda: _read_layer(req.out, prog.layers[i]["parts"], prog.modules(i)))
            install_dequantized(layer, i, lazy.spec, q)
        advance(layer, acts)
    lazy.release(i)


def _read_layer(out: Path, parts: list[str], modules: dict[str, ModuleRecord]) -> dict:
    """The quantized weights of a finished layer, read back from its part files."""
    tensors = {}
    for p in parts:
        with safe_open(out / p, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return {n: codec.decode(rec, {k: tensors[k] for k in codec.module_keys(rec, tensors)}) for n, rec in modules.items()}


def _write_rest(req: ConvertRequest, lazy: LazyModel, writer: CheckpointWriter, modules: dict, tokenizer) -> None:
    """The sentinel, the tensors outside the decoder layers (embeddings, norm, head), tokenizer, generation config."""
    dtype = DTYPES[req.dtype]
    lazy.load_rest(dtype)  # in the storage dtype: no full-precision copy of the embeddings and head
    rest = {k: v for k, v in codec.unique_state(lazy.model).items() if not k.startswith(lazy.spec.layers + ".")}
    rest = codec.stored_tensors(rest, {}, dtype)
    writer.add(codec.sentinel_tensor(next(iter(modules))))
    for k in list(rest):  # one big tensor per part: writing serializes a copy of the part in memory
        t = rest.pop(k)
        if t.numel() * t.element_size() >= BIG_TENSOR:
            writer.flush()
            writer.add({k: t})
            writer.flush()
        else:
            writer.add({k: t})
        del t
    lazy.release_rest()
    if tokenizer is not None:
        tokenizer.save_pretrained(req.out)
    if getattr(lazy.model, "generation_config", None) is not None:
        lazy.model.generation_config.save_pretrained(req.out)


def _summary(req: ConvertRequest, src, plan: QuantPlan, alloc, method: dict, prog: Progress, streamed: bool,
             modules: dict[str, ModuleRecord], t_load: float) -> dict:  # fmt: skip
    """summary.json, less what is only known once every file is written (file_bytes, times, peak RSS)."""
    q_bytes = sum(m.nbytes() for m in modules.values())
    q_weights = sum(m.shape[0] * m.shape[1] for m in modules.values())
    return {
        "llmq_version": __version__, "model": str(src), "out": str(req.out), "method": method,
        "scheme": plan.default.to_dict(), "scheme_name": plan.default.describe() + (" (mixed)" if alloc else "")
        + (f" (llama.cpp {req.gguf_recipe})" if req.gguf_recipe else ""),
        "arguments": prog.args, "streamed": streamed, "quantized_modules": len(modules), "quantized_weights": q_weights,
        "quantized_bytes": q_bytes, "bits_per_weight": 8 * q_bytes / max(q_weights, 1), "load_time_s": round(t_load, 2),
        "layers": [prog.layers[i]["report"] for i in sorted(prog.layers)], "versions": versions(), "machine": machine(),
    }  # fmt: skip


def _phase_totals(layers: list[dict]) -> dict[str, float]:
    """Seconds per phase over every layer (layers converted before a resume included, as recorded)."""
    tot: dict[str, float] = {}
    for r in layers:
        for p, sec in ((r or {}).get("phases") or {}).items():
            tot[p] = tot.get(p, 0.0) + sec
    return {p: round(sec, 2) for p, sec in tot.items()}


def _on_failure(out: Path, prog: Progress, e: BaseException) -> None:
    """Keep finished layers for a resume; remove a dir that holds nothing worth resuming."""
    if not prog.layers:
        if prog.created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for p in out.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    done = complete_config(out)
    if done is not None:  # never look complete
        try:
            atomic_write_json(out / "config.json", placeholder_config(done))
        except OSError:  # e.g. the disk is full: no config.json at all is incomplete too
            (out / "config.json").unlink(missing_ok=True)
    log.warning("llmq: %d finished layer(s) kept in %s; rerun the same command to resume", len(prog.layers), out)
    if isinstance(e, OSError) and e.errno == 28:
        raise LlmqError(f"{out}: no space left on device; free space, then rerun the same command to resume") from None
