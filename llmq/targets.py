"""`llmq quantize MODEL OUT --for TARGET[,TARGET...]`: the engine first. The target picks what it can hold and the
recipe measured best for it, the user's own flags override, everything is checked against the exporters before a
weight is read, and OUT ends up holding what the engine loads.

Targets: `vllm`, `sglang` (compressed-tensors, asymmetric: 1.8% lower perplexity than symmetric on SmolLM2 at
4-bit g64 and served by vLLM's CPU build, benchmarks/results/interop.md), `transformers` (compressed-tensors,
symmetric: transformers' compressed loader reads only symmetric packed weights), `gptq` (GPTQ v1, symmetric, the
grid vLLM's GPTQ kernels serve), `llama.cpp:MIX` (a GGUF of llama.cpp's mix MIX, e.g. Q4_K_M: `--gguf-recipe`),
`llmq` (llmq's own checkpoint, what `llmq quantize` writes without --for). For integer targets the group size is the
largest of 128, 64, 32 that divides every quantized linear's in_features (compressed-tensors and GPTQ have no short
last group); 4 bits; GPTQ with its default recipe.

Several targets share one run when one set of codes serves all of them: the integer targets agree when their grids
do (vllm + transformers take the symmetric grid both hold); llama.cpp's Q4_0 / Q8_0 are int4 / int8 symmetric g32 with
fp16 scales, which compressed-tensors and GPTQ hold too (the GGUF then has llama-quantize's types for that mix
without an importance matrix: every linear Q4_0 / Q8_0); the K-quant mixes have grids no integer target holds and are
refused beside them, as are two different mixes.

The work: the llmq checkpoint is written (resumable, as always) into `OUT.llmq` beside OUT, then each target is
exported from it into a staging dir beside OUT, renamed to OUT once all are written; `OUT.llmq` is removed unless
--keep-llmq (or `llmq` is one of the targets). A run killed at any point reruns with the same command: the
conversion resumes, the exports start over, and OUT comes out byte for byte the same.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import exporters, recipes
from .checkpoint import atomic_write_json, atomic_write_text
from .config import QuantPlan, QuantScheme
from .errors import LlmqError
from .exporters import gguf
from .formats.grouping import PER_CHANNEL
from .record import CheckpointRecord, ModuleRecord, WeightRecord

LLAMA_CPP = "llama.cpp:"
# engine -> (exporter, symmetric grid by default)
ENGINES = {"vllm": ("compressed-tensors", False), "sglang": ("compressed-tensors", False),
           "transformers": ("compressed-tensors", True), "gptq": ("gptq", True)}  # fmt: skip
NAMES = ("llmq", *ENGINES, f"{LLAMA_CPP}MIX")
GROUPS = (128, 64, 32)  # the group sizes an integer target is given, largest first
EXACT_MIXES = {"Q4_0": 4, "Q8_0": 8}  # mixes whose blocks are an integer grid: sym, g32, fp16 scales
WORK_SUFFIX = ".llmq"
SUMMARY = "llmq_export.json"


@dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    exporter: str  # "llmq" | "compressed-tensors" | "gptq" | "gguf"
    sym: bool = False  # the integer grid this engine is given when the user does not choose
    mix: str | None = None  # llama.cpp's mix (exporter "gguf")


def parse(spec: str) -> tuple[Target, ...]:
    """'vllm,llama.cpp:Q4_K_M' -> its targets (each once), or an error naming the bad one and the choices."""
    out: dict[str, Target] = {}
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        low = name.lower()
        if low == "llmq":
            t = Target("llmq", "llmq")
        elif low in ENGINES:
            t = Target(low, *ENGINES[low])
        elif low.startswith(LLAMA_CPP) or low == "llama.cpp":
            mix = name[len(LLAMA_CPP):].upper() if ":" in name else ""
            if not mix:
                raise LlmqError(f"--for {name}: name llama.cpp's mix, e.g. llama.cpp:Q4_K_M (mixes: "
                                f"{', '.join(recipes.MIXES)})")  # fmt: skip
            recipes.check_mix(mix)
            t = Target(f"{LLAMA_CPP}{mix}", "gguf", mix=mix)
        else:
            raise LlmqError(f"--for {name!r} is not a target; choose from {', '.join(NAMES)} (several: "
                            "comma-separated)")  # fmt: skip
        out.setdefault(t.name, t)
    if not out:
        raise LlmqError(f"--for: name a target: {', '.join(NAMES)}")
    return tuple(out.values())


def choose(targets: tuple[Target, ...], in_features: set[int], *, bits: int | None, group_size: int | None,
           sym: bool | None, fmt: str | None, gguf_recipe: str | None) -> dict:  # fmt: skip
    """What the targets take, given the user's own flags (None: not given): {bits, group_size, sym, format,
    gguf_recipe}. Refuses what no one set of codes can serve."""
    mixes = sorted({t.mix for t in targets if t.mix})
    ints = [t for t in targets if t.exporter in ("compressed-tensors", "gptq")]
    if gguf_recipe is not None and (mixes or ints):
        raise LlmqError("--gguf-recipe with --for: the target names the mix (--for llama.cpp:MIX); leave it out")
    if len(mixes) > 1:
        raise LlmqError(f"--for {', '.join(LLAMA_CPP + m for m in mixes)}: different llama.cpp mixes take different "
                        "codes; run llmq quantize once per mix")  # fmt: skip
    mix = mixes[0] if mixes else None
    if mix and not ints:
        if fmt not in (None, "int") or bits is not None or group_size is not None:
            raise LlmqError(f"--for {LLAMA_CPP}{mix} chooses every tensor's llama.cpp type; leave out "
                            "--format/--bits/--group-size")  # fmt: skip
        return {"bits": None, "group_size": None, "sym": bool(sym), "format": "int", "gguf_recipe": mix}
    if mix:
        if mix not in EXACT_MIXES:
            names = ", ".join(t.name for t in ints)
            raise LlmqError(f"--for {names},{LLAMA_CPP}{mix}: different grids; {mix}'s blocks (K-quants: "
                            f"super-blocks with 6-bit sub-scales) are no integer group grid that {names} can hold. "
                            f"Run llmq quantize once per target, or pair {names} with {LLAMA_CPP}Q4_0 or Q8_0 (int4 "
                            "/ int8 symmetric g32), which one set of codes serves")  # fmt: skip
        want = {"bits": EXACT_MIXES[mix], "group_size": 32, "sym": True}
        given = {"bits": bits, "group_size": group_size, "sym": sym}
        for k, v in given.items():
            if v is not None and v != want[k]:
                raise LlmqError(f"--for ...,{LLAMA_CPP}{mix} with {_flag(k, v)}: {mix}'s blocks are int"
                                f"{want['bits']} symmetric g32; leave the flag out")  # fmt: skip
        return {**want, "format": "int", "gguf_recipe": None}
    if fmt not in (None, "int"):
        names = ", ".join(t.name for t in ints)
        raise LlmqError(f"--format {fmt} with --for {names}: these engines read integer grids; leave out --format")
    if sym is False and any(t.exporter == "gptq" for t in ints):
        raise LlmqError("--for gptq with --no-sym: vLLM's GPTQ kernels serve symmetric codes only (and GPTQ v1 cannot "
                        "store a zero point of 0); leave out --no-sym, or for GPTQModel's v2 write an llmq checkpoint "
                        "and `llmq export --to gptq --gptq-format v2`")  # fmt: skip
    sym = any(t.sym for t in ints) if sym is None else sym
    if group_size is None:
        group_size = next((g for g in GROUPS if all(c % g == 0 for c in in_features)), PER_CHANNEL)
    return {"bits": bits or 4, "group_size": group_size, "sym": sym, "format": "int", "gguf_recipe": None}


def hint(targets: tuple[Target, ...], shapes: dict[str, tuple[int, int]]) -> str:
    """What --for picks by itself for these targets, as flags: the fix for a refusal of the user's own flags."""
    try:
        p = choose(targets, {c for _, c in shapes.values()}, bits=None, group_size=None, sym=None, fmt=None,
                   gguf_recipe=None)  # fmt: skip
    except LlmqError:
        return ""
    if p["gguf_recipe"]:
        return f"\nfix: leave out the scheme flags; --for picks --gguf-recipe {p['gguf_recipe']}"
    flags = " ".join(_flag(k, p[k]) for k in ("bits", "group_size", "sym"))
    return f"\nfix: leave out the scheme flags, or pass what --for picks here: {flags}"


def _flag(key: str, v) -> str:
    if key == "sym":
        return "--sym" if v else "--no-sym"
    return f"--{key.replace('_', '-')} {v}"


def why_not(targets: tuple[Target, ...], plan: QuantPlan, shapes: dict[str, tuple[int, int]], config: dict,
            candidates: dict[str, QuantScheme] | None = None, rows: bool = False, permuted: bool = False,
            method: dict | None = None, metadata_from_config: bool = True) -> list[str]:  # fmt: skip
    """What each target's exporter would refuse in the checkpoint this plan makes, from the shapes alone (no weight
    read): '--for T: MODULE why (and N more)' per refusing target. Mixed precision: any linear may get any of
    `candidates` (row granularity: several, split by row). metadata_from_config: False for a .gguf source, whose
    own metadata the GGUF export copies (its rotary parameters are then not written from config.json)."""
    out = []
    mods = _records(plan, shapes, candidates, rows, permuted)
    for t in targets:
        if t.exporter == "llmq":
            continue
        problems = []
        if t.exporter == "gguf":
            if why := gguf.why_not_config(config, metadata_from_config):
                problems.append(f"the model: {why}")
        check = gguf.block_type_of if t.exporter == "gguf" else None
        exp = None if check else exporters.EXPORTERS[t.exporter]
        for m in mods:
            why = check(m)[1] if check else exp.why_not(m, {})
            if why:
                problems.append(f"{m.name} {why}")
        if exp is not None and getattr(exp, "why_not_model", None):
            rec = CheckpointRecord(plan.default, {}, {m.name: m for m in mods}, (), method or {}, None)
            if mods_why := exp.why_not_model(rec, {}):
                problems.insert(0, f"the model {mods_why}")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            out.append(f"--for {t.name}: {problems[0]}{more}")
    return out


def _records(plan: QuantPlan, shapes: dict, candidates, rows: bool, permuted: bool) -> list[ModuleRecord]:
    """The module records a conversion with this plan would write (mixed precision: candidates round-robin)."""
    cand = list(candidates.values()) if candidates else []
    out = []
    for i, (name, shape) in enumerate(shapes.items()):
        if rows and len(cand) > 1:
            half = shape[0] // 2
            pieces = tuple(WeightRecord(s, (r, shape[1])) for s, r in ((cand[0], half), (cand[1], shape[0] - half)))
            out.append(ModuleRecord(name, shape, pieces, True))
            continue
        s = cand[i % len(cand)] if cand else plan.scheme_for(name)
        out.append(ModuleRecord(name, shape, (WeightRecord(s, shape, int(bool(s.outliers)), permuted),)))
    return out


def work_dir(out: Path) -> Path:
    return out.parent / (out.name + WORK_SUFFIX)


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must be new, empty, or (with --overwrite) an earlier `--for` output: said before any work."""
    if out.exists() and not out.is_dir():
        raise LlmqError(f"{out}: exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SUMMARY).is_file():
            raise LlmqError(f"{out}: not empty and not an llmq export; choose another OUT (nothing was written)")
        if not overwrite:
            raise LlmqError(f"{out}: holds an earlier llmq export; pass --overwrite to replace it")


def export_all(targets: tuple[Target, ...], work: Path, out: Path, dtype: str, quiet: bool, keep: bool) -> dict:
    """Export the finished llmq checkpoint `work` to every target into OUT (staged beside it, renamed when all are
    written); returns {target: export summary}."""
    engines = [t for t in targets if t.exporter != "llmq"]
    stage = out.parent / f".{out.name}.llmq-for-tmp"
    shutil.rmtree(stage, ignore_errors=True)
    done: dict[str, dict] = {}
    by_exporter: dict[tuple, str] = {}
    name = _model_name(work)
    try:
        single = len({(t.exporter, t.mix) for t in engines}) == 1 and engines[0].exporter != "gguf"
        if not single:
            stage.mkdir(parents=True)
        for t in engines:
            key = (t.exporter, t.mix)
            if key in by_exporter:  # vllm and sglang: the same files, written once
                done[t.name] = {"same_as": by_exporter[key]}
                continue
            by_exporter[key] = t.name
            if t.exporter == "gguf":
                rel = f"{name}-{t.mix}.gguf"
                s = exporters.export(work, stage / rel, "gguf", quiet=quiet)
            else:
                rel = "." if single else _slug(t.name)
                s = exporters.export(work, stage / rel, t.exporter, dtype=dtype, quiet=quiet, shown_as=out / rel)
            done[t.name] = {k: v for k, v in s.items() if k not in ("seconds", "source")} | {"dest": str(out / rel)}
        if not single:
            atomic_write_json(stage / SUMMARY, {"targets": done, "llmq_checkpoint": str(work) if keep else None})
            atomic_write_text(stage / "README.md", _card(name, done, engines))
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier `--for` output with --overwrite: checked before any work
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(work)
    return done


def _slug(name: str) -> str:
    return name.replace(":", "-")


def _model_name(work: Path) -> str:
    try:
        return Path(json.loads((work / "summary.json").read_text())["model"]).name.removesuffix(".gguf") or "model"
    except (OSError, ValueError, KeyError):
        return "model"


def _card(name: str, done: dict, engines) -> str:
    lines = [f"# {name}, quantized by llmq for {', '.join(t.name for t in engines)}", ""]
    for t in engines:
        s = done[t.name]
        if "same_as" in s:
            lines.append(f"- {t.name}: the files of {s['same_as']}")
            continue
        what = f"`{s['dest']}`: {s.get('mix') or s.get('scheme')}, {s['to']}"
        lines.append(f"- {t.name}: {what}; every weight llmq's own dequantization "
                     f"({s['exact_modules']}/{s['modules']} modules bit for bit)")  # fmt: skip
    lines += ["", "Run: vLLM / SGLang `vllm serve DIR`; transformers `AutoModelForCausalLM.from_pretrained(DIR)` "
              "(with compressed-tensors installed); llama.cpp `llama-cli -m FILE.gguf`.", ""]  # fmt: skip
    return "\n".join(lines)

