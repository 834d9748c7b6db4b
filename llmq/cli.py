"""The `llmq` command line: quantize | export | eval | report | inspect (argparse lives only here)."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import transformers

from . import formats, recipes, sources, targets
from .archs import describe, describe_lines, linear_shapes_of
from .checkpoint import atomic_write_json
from .config import (
    EXPERT_POLICIES,
    GPTQ_CLIP_SEARCH,
    GPTQ_INPUTS,
    GPTQ_INPUTS_WHY,
    REFINE_DEFAULT_MAX_BITS,
    REFINE_FROM,
    REFINE_STEPS,
    REFINE_WHY,
    refine_by_default,
    CalibConfig,
    GPTQConfig,
    MixedConfig,
    QuantPlan,
    QuantScheme,
    scheme_from_name,
)
from .convert import ConvertRequest, convert, shaped_plan
from .dtypes import DTYPE_NAMES
from .distributed import DEFAULT_TIMEOUT_S
from .errors import LlmqError
from .eval.plots import plot_allocation, plot_layer
from .eval.report import report
from .eval.run import evaluate, print_record
from .exporters import TARGETS, export
from .exporters.gguf import EMBEDDING_TYPES
from .exporters.gguf import print_summary as print_gguf_summary
from .inspect import inspect_dir, print_table
from .rotation import KINDS as ROTATIONS
from .rotation import ROTATE_WHEN, Rotation, RotationConfig

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(s: str) -> int:
    m = SIZE_RE.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size; write e.g. 2GB, 500MB")
    mult = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper().rstrip("B").rstrip("I") or ""]
    if "I" in m.group(2).upper():
        mult = {1e3: 1024, 1e6: 1024**2, 1e9: 1024**3, 1e12: 1024**4}.get(mult, mult)
    return int(float(m.group(1)) * mult)


def parse_range(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a range; write LO:HI, e.g. 0.5:1") from None
    return lo, hi


def parse_candidates(s: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("--candidates: give at least one scheme, e.g. int3-g128,int4-g128")
    for n in names:
        try:
            scheme_from_name(n)
        except LlmqError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


# ---- quantize -----------------------------------------------------------------------------------
def add_scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheme")
    g.add_argument("--bits", type=int, default=None,
                   help="code width: 2, 3, 4 or 8 for int (default 4); a codebook format implies its own")
    g.add_argument("--format", choices=tuple(formats.FORMATS), default=None,
                   help="; ".join(f"{n}: {f.help}" for n, f in formats.FORMATS.items())
                   + " (default int; codebooks are absmax-scaled per group; docs/FORMAT.md)")
    g.add_argument("--group-size", type=int, default=None,
                   help="columns per scale: 32/64/128/256 (any >= 16), -1 per output channel, 0 per tensor "
                        "(default 128; llama.cpp's block formats q4_0 ... q6_k fix their own)")
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric integer grid (no zero points stored); default asymmetric, or what --for picks")
    g.add_argument("--double-quant", action="store_true", help="re-quantize the scales to 8 bits (QLoRA)")
    g.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="per group, search the range shrink with least error (default: on with --method gptq, "
                        "measured best at 2-4 bits, benchmarks/results/gptq_recipe.md; off with rtn)")
    g.add_argument("--outliers", type=float, default=0.0, metavar="FRAC",
                   help="fraction of weights kept exact in fp16, e.g. 0.005")
    g.add_argument("--scale-dtype", choices=DTYPE_NAMES, default="float16",
                   help="storage dtype of the per-group scales (default float16; bfloat16 / float32 for weights whose "
                        "scales overflow float16)")


def scheme_from_args(a) -> QuantScheme:
    clip = a.clip_search
    if clip is None:  # the measured default: GPTQ with clip search (GPTQ_CLIP_SEARCH), RTN as before
        clip = GPTQ_CLIP_SEARCH if a.method == "gptq" else False
    return QuantScheme(bits=a.bits, format=a.format or "int", group_size=a.group_size, sym=bool(a.sym),
                       double_quant=a.double_quant, scale_dtype=a.scale_dtype, clip_search=clip,
                       outliers=a.outliers)  # fmt: skip


def quantize_request(a) -> ConvertRequest:
    """The ConvertRequest the `llmq quantize` flags describe."""
    if a.candidates is not None and a.target_bpw is None:
        raise LlmqError("--candidates is only used with --target-bpw BITS (mixed precision)")
    if a.granularity == "row" and a.target_bpw is None:
        raise LlmqError("--granularity row is only used with --target-bpw BITS (mixed precision)")
    a.method = a.method or "rtn"
    gptq = a.method == "gptq"
    mixed = None if a.target_bpw is None else MixedConfig(a.target_bpw, a.candidates, a.granularity)
    scheme = scheme_from_args(a)
    refine = a.refine
    if refine is None:  # the measured default: refined at <= 3 bits (config.refine_by_default)
        refine = REFINE_STEPS if gptq and refine_by_default(scheme, mixed, a.gguf_recipe) else 0
    gcfg = GPTQConfig(damp=a.damp, act_order=a.act_order, static_groups=a.static_groups, inputs=a.gptq_inputs,
                      sequential=a.gptq_sequential, replay=a.gptq_replay, expert_policy=a.expert_policy,
                      expert_min_tokens=a.expert_min_tokens,
                      experts_per_pass=a.experts_per_pass, refine=refine, refine_seqlen=a.refine_seqlen,
                      refine_lr=a.refine_lr, refine_clip=a.refine_clip,
                      refine_from=a.refine_from, refine_target=a.refine_target) if gptq else None  # fmt: skip
    if a.refine and not gptq:
        raise LlmqError("--refine trains the rounding GPTQ chose: add --method gptq (calibration data is needed)")
    calib = CalibConfig(source=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, split=a.calib_split,
                        token_range=a.calib_range) if gptq or mixed else None  # fmt: skip
    if a.gguf_recipe is not None and (a.format not in (None, "int") or a.bits is not None or a.group_size is not None):
        raise LlmqError("--gguf-recipe chooses every tensor's llama.cpp type; leave out --format/--bits/--group-size")
    return ConvertRequest(a.model, Path(a.out), a.method, scheme, gcfg, calib, mixed, a.gguf_recipe,
                          a.dtype, a.max_shard_size, a.device, a.offload_activations, a.overwrite, a.quiet,
                          RotationConfig(a.rotate, a.rotate_seed), a.dist_timeout)  # fmt: skip


def cmd_quantize(a, on_layer_done=None) -> int:
    """`llmq quantize`; `on_layer_done(i)` runs once decoder layer i is on disk (tests interrupt a run there)."""
    if a.for_:
        return quantize_for(a, on_layer_done)
    req = quantize_request(a)
    if a.dry_run:  # what discovery finds, from the config alone: no weight is read, nothing is written
        config = sources.load_config(sources.resolve(a.model))
        found = describe(config)
        if req.rotate.active:
            Rotation(req.rotate, config)  # refused here, with the reason, where the family cannot be rotated
        print(json.dumps(found, indent=2) if a.json else "\n".join(describe_lines(found)))
        return 0
    summary = convert(req, on_layer_done)
    if a.json and summary:  # under torchrun only rank 0 has the summary
        print(json.dumps(summary, indent=2))
    return 0


def quantize_for(a, on_layer_done=None) -> int:
    """`llmq quantize MODEL OUT --for TARGETS` (llmq/targets.py): pick and check against the targets' exporters from
    the config alone, convert into OUT.llmq (resumable), export every target into OUT."""
    wanted = targets.parse(a.for_)
    if all(t.exporter == "llmq" for t in wanted):
        a.for_ = None
        return cmd_quantize(a, on_layer_done)
    out = Path(a.out)
    targets.check_out(out, a.overwrite)
    src = sources.resolve(a.model)
    config = sources.load_config(src)
    shapes, n_layers = linear_shapes_of(config)
    picked = targets.choose(wanted, {c for _, c in shapes.values()}, bits=a.bits, group_size=a.group_size, sym=a.sym,
                            fmt=a.format, gguf_recipe=a.gguf_recipe)  # fmt: skip
    a.bits, a.group_size, a.sym, a.format, a.gguf_recipe = (picked[k] for k in ("bits", "group_size", "sym", "format",
                                                                                  "gguf_recipe"))  # fmt: skip
    a.method = a.method or "gptq"  # the measured recipe (benchmarks/results/gptq_recipe.md)
    a.out = str(targets.work_dir(out))
    req = quantize_request(a)
    plan = shaped_plan(req, QuantPlan(req.scheme), config, shapes, n_layers)
    cands = req.mixed.schemes(**req.candidate_base()) if req.mixed else None
    permuted = bool(req.gptq and req.gptq.act_order and not req.gptq.static_groups)
    rows = bool(req.mixed and req.mixed.granularity == "row")
    problems = targets.why_not(wanted, plan, shapes, config.to_dict(), cands, rows, permuted, {"name": req.method},
                               metadata_from_config=src.kind != "gguf")  # fmt: skip
    if problems:
        raise LlmqError("cannot quantize for " + ", ".join(t.name for t in wanted) + " as asked (nothing was read or "
                        "written):\n  " + "\n  ".join(problems) + targets.hint(wanted, shapes))  # fmt: skip
    picks = (f"for {', '.join(t.name for t in wanted)}: {req.method} {req.gguf_recipe or req.scheme.describe()}; "
             f"llmq checkpoint in {a.out}, then {out}")  # fmt: skip
    if a.dry_run:  # what --for picked and what discovery found: nothing read, nothing written
        print(json.dumps({"for": picks, **describe(config)}, indent=2) if a.json else
              "\n".join([picks, *describe_lines(describe(config))]))  # fmt: skip
        return 0
    if not a.quiet:
        print(picks, flush=True)
    summary = convert(req, on_layer_done)
    if not summary:  # a rank other than 0 under torchrun: rank 0 exports
        return 0
    keep = a.keep_llmq or any(t.exporter == "llmq" for t in wanted)
    done = targets.export_all(wanted, Path(a.out), out, a.dtype, a.quiet, keep)
    if a.json:
        print(json.dumps({"quantize": summary, "exports": done}, indent=2))
    elif not a.quiet:
        kept = f"; the llmq checkpoint is kept in {a.out}" if keep else ""
        print(f"wrote {out} for {', '.join(done)}{kept}")
    return 0


# ---- inspect ------------------------------------------------------------------------------------
def cmd_inspect(a) -> int:
    info = inspect_dir(Path(a.dir), verify=not a.no_verify)
    if a.plot_allocation:
        print(f"wrote {plot_allocation(info, Path(a.plot_allocation))}")
        return 0
    if a.plot:
        out = Path(a.plot_out or f"{a.plot.replace('.', '_')}.png")
        print(f"wrote {plot_layer(Path(a.dir), a.plot, out, a.source)}")
        return 0
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print_table(info)
    return 0


# ---- export -------------------------------------------------------------------------------------
def cmd_export(a) -> int:
    summary = export(a.src, a.dest, a.to, a.dtype, a.gptq_format, a.overwrite, a.quiet, a.gguf_embedding_type,
                     a.gguf_metadata)  # fmt: skip
    if a.json:
        print(json.dumps(summary, indent=2))
    elif a.to == "gguf":
        print_gguf_summary(summary)
    elif not a.quiet:
        exact = ("every weight equal to llmq's dequantization" if not summary["weight_diff"] else
                 f"{summary['exact_modules']} of {summary['modules']} modules exact, largest weight difference "
                 f"{summary['max_weight_diff']:.3g} (scales rounded to {summary['dtype']})")  # fmt: skip
        print(f"exported {summary['modules']} linears to {a.dest} ({a.to}): {exact}")
    return 0


# ---- eval / report ------------------------------------------------------------------------------
def cmd_eval(a) -> int:
    record = evaluate(a)
    print_record(record)
    if a.json:
        atomic_write_json(Path(a.json), record)
        print(f"wrote {a.json}")
    return 0


def cmd_report(a) -> int:
    for path in report([Path(p) for p in a.results], Path(a.out)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmq", description="Weight-only quantization of Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint",
                       description="Quantize MODEL (HF dir, hub id or .gguf file) into the checkpoint dir OUT.")
    q.add_argument("model", metavar="MODEL", help="Hugging Face model dir, hub id, or .gguf file")
    q.add_argument("out", metavar="OUT", help="output directory (must be new or empty, see --overwrite)")
    q.add_argument("--method", choices=("rtn", "gptq"), default=None,
                   help="round-to-nearest or GPTQ (default rtn; gptq with --for)")
    q.add_argument("--for", dest="for_", default=None, metavar="TARGET[,TARGET]",
                   help="what OUT is for: " + ", ".join(targets.NAMES) + ". The target picks the scheme it can hold "
                        "and the measured best recipe (your flags override), everything is checked before a weight "
                        "is read, and OUT holds what the engine loads (the llmq checkpoint is written, resumable, "
                        "in OUT.llmq and removed at the end; --keep-llmq keeps it). Default llmq: OUT is llmq's own "
                        "checkpoint")
    q.add_argument("--keep-llmq", action="store_true", help="with --for: keep the llmq checkpoint in OUT.llmq")
    add_scheme_args(q)
    g = q.add_argument_group("gptq / calibration")
    g.add_argument("--calib", default=None, metavar="PATH|NAME",
                   help="calibration text: a .txt/.jsonl file, a wikitext-2-raw dir, or a datasets name "
                        "(wikitext2, c4, ptb); default: a local ../shared/data/wikitext-2-raw")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    g.add_argument("--calib-split", default="train", help="split of a wikitext-style dir or dataset (default train)")
    g.add_argument("--calib-range", type=parse_range, default=(0.0, 1.0), metavar="LO:HI",
                   help="draw windows only from this fraction of the tokens, e.g. 0.5:1 keeps the first half "
                        "for evaluation (default 0:1)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing the windows (default 0)")
    g.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize columns by decreasing Hessian diagonal (default on)")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="with act-order: fix group scales up front, no permutation stored (default on)")
    g.add_argument("--gptq-inputs", choices=GPTQ_INPUTS, default=GPTQConfig.inputs,
                   help="activations each linear's Hessian comes from: 'quantized' (standard GPTQ: the outputs of "
                        "the already-quantized layers and groups) or 'fp' (the full-precision model's) "
                        f"(default {GPTQConfig.inputs}: {GPTQ_INPUTS_WHY})")
    g.add_argument("--gptq-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="with --gptq-inputs quantized: quantize a layer's linears group by group (q/k/v, o, gate/up, "
                        "down), each from the outputs of the groups before it (default on; off: every H of a layer "
                        "from one pass of the unquantized layer, as the original GPTQ code)")
    g.add_argument("--gptq-replay", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each finished attention / MLP block's last-linear input per calibration window and "
                        "replay the block instead of recomputing it (default on: ~3x faster; costs calibration "
                        "tokens x (hidden + intermediate) values of memory, on the CPU with --offload-activations); "
                        "--no-gptq-replay recomputes: identical results, less memory")
    e = q.add_argument_group("mixture of experts (GPTQ; each expert's linears on the tokens routed to it)")
    e.add_argument("--expert-policy", choices=EXPERT_POLICIES, default="layer",
                   help="an expert routed fewer than --expert-min-tokens calibration tokens: 'layer' takes its "
                        "Hessian from every token of the layer, 'rtn' rounds it to nearest; 'all' gives every expert "
                        "every token's Hessian (llm-compressor's moe_calibrate_all_experts). Default layer: "
                        "benchmarks/results/moe.md")  # fmt: skip
    e.add_argument("--expert-min-tokens", type=int, default=None, metavar="N",
                   help="fewer routed tokens than this gets --expert-policy (default: the expert's input width, "
                        "below which its Hessian is rank deficient)")  # fmt: skip
    e.add_argument("--experts-per-pass", type=int, default=0, metavar="N",
                   help="experts whose Hessians are held at once (default: as many as 8 GiB of fp32 Hessians hold; "
                        "docs/SCALE.md); does not change the result, so an interrupted run may resume with "
                        "another")  # fmt: skip
    f = q.add_argument_group("learned rounding (after GPTQ; llmq/pipeline/refine.py)")
    f.add_argument("--refine", type=int, nargs="?", const=REFINE_STEPS, default=None, metavar="STEPS",
                   help=f"after GPTQ, train each decoder layer's rounding (an offset per weight, each code at most "
                        f"one step from GPTQ's) and a scale factor per group on the layer's output, STEPS signed "
                        f"gradient steps (AutoRound's method; the stored grid is unchanged, so every export carries "
                        f"it). Default with --method gptq: {REFINE_STEPS} steps on an integer grid of "
                        f"<= {REFINE_DEFAULT_MAX_BITS} bits, else off; bare --refine: {REFINE_STEPS} steps; --refine 0: "
                        f"off. {REFINE_WHY}")  # fmt: skip
    f.add_argument("--refine-seqlen", type=int, default=GPTQConfig.refine_seqlen, metavar="TOKENS",
                   help=f"tokens of each calibration window (its prefix) the refinement trains on "
                        f"(default {GPTQConfig.refine_seqlen})")  # fmt: skip
    f.add_argument("--refine-lr", type=float, default=GPTQConfig.refine_lr, metavar="LR",
                   help=f"signed-gradient step size, falling linearly to 0 (default {GPTQConfig.refine_lr}: on "
                        "SmolLM2 int3 g128 0.01 beat 0.005; benchmarks/results/refine.md)")  # fmt: skip
    f.add_argument("--refine-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="learn a scale factor per group (clipping the range where it shrinks) as well as the "
                        "rounding (default on; llama.cpp's block formats learn the rounding only)")  # fmt: skip
    f.add_argument("--refine-from", choices=REFINE_FROM, default=GPTQConfig.refine_from,
                   help=f"the codes the refinement starts from (default {GPTQConfig.refine_from})")
    f.add_argument("--refine-target", choices=GPTQ_INPUTS, default=GPTQConfig.refine_target,
                   help="what each layer's output is trained towards: 'fp': the fp model's own output of the layer, "
                        "so each layer also makes up for the error of the quantized layers before it; 'quantized': "
                        "the fp layer's output on the inputs the quantized model gives it (AutoRound's) (default "
                        f"{GPTQConfig.refine_target}: measured better, benchmarks/results/refine.md)")  # fmt: skip
    m = q.add_argument_group("mixed precision")
    m.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                   help="choose a scheme per linear by measured sensitivity so that the average bits per weight "
                        "(all metadata counted) is at most BITS, e.g. 3.5; needs calibration data (--calib), "
                        "and --bits/--group-size/--format are then replaced by --candidates")
    m.add_argument("--candidates", type=parse_candidates, default=None, metavar="LIST",
                   help="comma-separated schemes to choose from, e.g. int3-g128,int4-g128,int8-g128,"
                        "int4-g128-out0.005 (default: config.DEFAULT_CANDIDATES, 15 schemes: int2, NF3, int3, NF4 "
                        "and int8 at group sizes 32..256, +-0.5%% outliers); "
                        "--sym, --clip-search and --scale-dtype apply to each")
    m.add_argument("--granularity", choices=("linear", "row"), default="linear",
                   help="'linear': one scheme per linear (default); 'row': one scheme per output row, each linear "
                        "stored as up to one piece per scheme (docs/FORMAT.md; lower perplexity at the same size "
                        "on SmolLM2, benchmarks/results/mixed.md); default candidates then "
                        "config.DEFAULT_ROW_CANDIDATES (int2-g32-dq, nf3-g128-dq, nf4-g128-dq, int8-g128)")
    q.add_argument_group("llama.cpp").add_argument(
        "--gguf-recipe", default=None, metavar="MIX", type=str.upper, choices=tuple(recipes.MIXES),
        help="llama.cpp's named mix (" + ", ".join(recipes.MIXES) + "): every linear gets the block type "
             "llama-quantize gives it (with calibration: as with an importance matrix), chosen by RTN or GPTQ on that "
             "grid; export with `llmq export OUT FILE.gguf --to gguf`. Replaces --format/--bits/--group-size; "
             "--clip-search applies")  # fmt: skip
    r = q.add_argument_group("rotation")
    r.add_argument("--rotate", choices=ROTATIONS, default="none",
                   help="fuse an orthogonal rotation of the residual stream (and one per attention head) into the "
                        "weights before quantizing, so that no channel stands out (QuaRot/SpinQuant without online "
                        "transforms): 'hadamard' (randomized Hadamard), 'random' (random orthogonal) or 'none' "
                        "(default). The output is a plain model of the same architecture (norm weights folded, a tied "
                        "head untied: V x H more in the file); Llama, Mistral, Qwen2 only. " + ROTATE_WHEN)
    r.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs (default 0)")
    d = q.add_argument_group("devices and processes",
                             "Several processes (GPUs, machines): launch with torchrun, e.g. `torchrun "
                             "--nproc-per-node 8 -m llmq quantize MODEL OUT --method gptq --device cuda`. The "
                             "calibration windows are split over the ranks, each linear's Hessian is summed onto the "
                             "rank that solves it, and rank 0 writes OUT (docs/SCALE.md). Resumes with any number "
                             "of processes.")  # fmt: skip
    d.add_argument("--device", default=None,
                   help="run the active layer on this device, e.g. cuda:0 (default cpu); under torchrun, 'cuda' "
                        "gives each rank its own GPU (LOCAL_RANK)")  # fmt: skip
    d.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU when the layer runs on a GPU")
    d.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (a solve, a collective) before it "
                        f"gives up; a rank that dies fails the others at once (default {DEFAULT_TIMEOUT_S:g})")  # fmt: skip
    o = q.add_argument_group("output")
    o.add_argument("--dtype", choices=DTYPE_NAMES, default="float16",
                   help="storage dtype of the layers left in full precision (default float16)")
    o.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest shard file (default 2GB)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing llmq output dir (an interrupted one is resumed without this)")
    o.add_argument("--quiet", action="store_true", help="no progress bars or per-layer lines")
    o.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    o.add_argument("--dry-run", action="store_true",
                   help="only show what llmq found in the model (found by running one layer on the meta device: the "
                        "decoder layers, each group of linears sharing one input and so one Hessian, in the order "
                        "they are quantized, and what stays in full precision) and exit; reads the config only, "
                        "writes nothing (with --json: as JSON)")  # fmt: skip
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model (full precision or llmq) on a text",
                       description="Perplexity with the GPTQ protocol: text tokenized once without BOS, "
                                   "non-overlapping windows of --seqlen, exp(mean NLL of all scored tokens).")
    e.add_argument("model", metavar="MODEL", help="llmq checkpoint dir, HF model dir, hub id, or .gguf file")
    e.add_argument("--dataset", default=None, metavar="NAME|PATH",
                   help="wikitext2 (default; read locally from ../shared/data/wikitext-2-raw when present), "
                        "ptb, c4, a wikitext-2-raw dir, or a .txt/.jsonl file")
    e.add_argument("--split", default="test", help="split (default test)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    e.add_argument("--stride", type=int, default=None, help="sliding windows every N tokens (default: seqlen)")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="activation dtype (default float32 on CPU, float16 on CUDA)")
    e.add_argument("--label", default=None, help="name of this run in reports")
    e.add_argument("--json", default=None, metavar="OUT", help="write the JSON record to OUT")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write an llmq checkpoint in a format serving engines load (vLLM, transformers)",
                       description="Re-lay an llmq checkpoint's own codes (never re-rounded) as a compressed-tensors "
                                   "or GPTQ checkpoint. Every module is checked against the target first; nothing is "
                                   "written at DEST unless the whole export succeeds.")  # fmt: skip
    x.add_argument("src", metavar="SRC", help="llmq checkpoint dir (written by llmq quantize)")
    x.add_argument("dest", metavar="DEST", help="output dir (new or empty; see --overwrite)")
    x.add_argument("--to", required=True, choices=TARGETS,
                   help="compressed-tensors: vLLM / SGLang's native format, integer schemes incl. mixed precision; "
                        "gptq: GPTQ checkpoints (vLLM reads symmetric 4/8-bit); gguf: one .gguf file for llama.cpp, "
                        "from a checkpoint of llama.cpp block formats (llmq quantize --gguf-recipe Q4_K_M, or "
                        "--format q4_0/q4_k/...), its blocks copied as they are")
    x.add_argument("--dtype", choices=DTYPE_NAMES, default="float16",
                   help="dtype of the scales and of the full-precision tensors (default float16; float32 keeps "
                        "double-quantized scales exact)")
    x.add_argument("--gptq-format", choices=("v1", "v2"), default="v1",
                   help="--to gptq: v1 ('gptq', what vLLM reads: stores zero - 1) or v2 ('gptq_v2', GPTQModel)")
    x.add_argument("--gguf-embedding-type", choices=EMBEDDING_TYPES, default="auto",
                   help="--to gguf: type of the token embeddings and output head (default auto: what llama-quantize "
                        "gives them for the checkpoint's mix, e.g. q6_k, or q8_0 when the rows are no multiple of 256)")
    x.add_argument("--gguf-metadata", default=None, metavar="FILE.gguf|config",
                   help="--to gguf: copy the architecture and tokenizer metadata from this GGUF of the same model, or "
                        "'config' to write them from config.json and tokenizer.json (default: the .gguf the "
                        "checkpoint was converted from, if it still exists; else 'config')")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier llmq export at DEST")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--json", action="store_true", help="print the export summary as JSON")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="compare eval results: markdown table and plots",
                       description="Compare records written by `llmq eval --json` (measured on the same text): "
                                   "report.md with a table of perplexity, bits per weight, size and speed, and PNG "
                                   "plots of perplexity against bits per weight and of size and speed.")  # fmt: skip
    r.add_argument("results", nargs="+", metavar="RESULTS.json", help="records written by `llmq eval --json`")
    r.add_argument("--out", required=True, metavar="DIR", help="where to write report.md and the PNGs")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", help="show the schemes, sizes and bits per weight of a checkpoint",
                       description="Check an llmq checkpoint (shards readable, sha256 against the index, tensors "
                                   "against config.json; exit 2 if not) and show each quantized module's scheme, "
                                   "shape, size and bits per weight; optional plots of a module's weights against its "
                                   "grid, or of a mixed-precision allocation.")  # fmt: skip
    i.add_argument("dir", metavar="DIR", help="llmq checkpoint dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-verify", action="store_true",
                   help="skip hashing the shards against the index's sha256 (about 1 s per GB); headers are still "
                        "checked against config.json")
    i.add_argument("--plot", metavar="LAYER", default=None,
                   help="write a PNG of this module's weights against its grid, and its per-group error")
    i.add_argument("--plot-allocation", metavar="PNG", default=None,
                   help="write a PNG map of the scheme and bits per weight of every linear (for mixed precision)")
    i.add_argument("--plot-out", metavar="PNG", default=None, help="where to write the plot (default LAYER.png)")
    i.add_argument("--source", metavar="MODEL", default=None,
                   help="the full-precision model, for --plot (default: the one named in summary.json)")
    i.set_defaults(func=cmd_inspect)
    return p


def _stopped(signum, frame):
    raise LlmqError(f"rank {os.environ.get('RANK', '?')}: stopped by SIGTERM (torchrun stops every rank when one "
                    "fails: see its report above); finished layers are kept, rerun the same command to resume")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    quiet = getattr(a, "quiet", False) or (ranked and os.environ.get("RANK", "0") != "0")
    if ranked:  # torchrun stops the other ranks with SIGTERM when one fails: end as an error, not a bare kill
        signal.signal(signal.SIGTERM, _stopped)
    logging.basicConfig(level=logging.INFO if not quiet else logging.WARNING, format="%(message)s")
    if quiet:  # transformers' own bars too: loading weights, and de-quantizing a .gguf (a plain tqdm there)
        transformers.utils.logging.disable_progress_bar()
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    try:
        return a.func(a)
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmq: interrupted", file=sys.stderr)
        return 130
