"""Exports: an llmq checkpoint re-laid for the engines people serve with, writing llmq's own codes (never re-rounded).

A registry with one module per target, each giving:

    NAME, SHARD_METADATA
    why_not(module_record, opts) -> str | None     can the target hold this module as llmq stored it? else why, and
                                                   which `llmq quantize` flags avoid it
    encode(name, qw, dtype, opts) -> tensors       the module's tensors in the target's layout (bias excluded)
    dequantize(name, tensors, qw, dtype) -> W      the weight [R, C] the target computes from them, in `dtype`
    config(record, opts) -> dict                   the target's `quantization_config`
    serving(dest) -> str                           how to run it (model card)
    optional: why_not_model(record, opts), why_not_data(qw, opts) (qw holds only the module's zero points)

`export` checks every module (and the data a target is particular about) before writing anything, writes a complete
Hugging Face model dir into a temporary dir beside DEST (shards, index, tokenizer, generation config, model card,
llmq_export.json, config.json last) and renames it to DEST: nothing at DEST loads until the export is complete.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import ModuleType

import torch
from tqdm.auto import tqdm

from .. import codec, moe, record, verify
from ..checkpoint import INDEX_NAME, CheckpointReader, CheckpointWriter, atomic_write_json, atomic_write_text
from ..dtypes import DTYPES
from ..errors import LlmqError
from ..qtensor import QuantizedWeight
from ..summary import versions
from . import compressed_tensors, gguf, gptq

EXPORTERS: dict[str, ModuleType] = {m.NAME: m for m in (compressed_tensors, gptq)}
TARGETS = (*EXPORTERS, gguf.NAME)  # gguf writes one file, not a model dir: exporters/gguf.py
SUMMARY_NAME = "llmq_export.json"
# what `llmq quantize --for` would have written for this target (llmq/targets.py), said with a refusal
FOR_HINT = {"compressed-tensors": "`llmq quantize MODEL OUT --for vllm` (or sglang, transformers) picks a scheme "
                                  "compressed-tensors holds and exports it in the same run",
            "gptq": "`llmq quantize MODEL OUT --for gptq` picks a scheme GPTQ holds and exports it in the same run",
            "gguf": gguf.FOR_HINT}  # fmt: skip
# families whose experts' layout an export does not write yet, and why
NO_EXPERT_LAYOUT = {"gpt_oss": "gpt-oss's experts (interleaved gate/up with biases) are read by vLLM's gpt-oss loader "
                                "as its own fused w13/w2 layout (MXFP4 or 16-bit), which llmq does not write yet"}
NOT_COPIED = {"config.json", INDEX_NAME, "summary.json", "README.md", "llmq_progress.json", "sensitivity.json",
              "sensitivity_rows.safetensors"}  # fmt: skip


def export(src, dest, to: str, dtype: str = "float16", gptq_format: str = "v1", overwrite: bool = False,
           quiet: bool = True, gguf_embedding_type: str = "auto", gguf_metadata=None, shown_as=None) -> dict:  # fmt: skip
    """Export the llmq checkpoint `src` as a `to` checkpoint into `dest` (for "gguf": one file); returns the export
    summary. gguf_embedding_type / gguf_metadata: see exporters/gguf.py. shown_as: the path the summary and the model
    card name (default dest; `--for` writes into a staging dir that is renamed afterwards)."""
    if to == gguf.NAME:
        return gguf.export(src, dest, gguf_embedding_type, gguf_metadata, overwrite, quiet)
    if to not in EXPORTERS:
        raise LlmqError(f"--to {to!r} is not an export target; choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise LlmqError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if gptq_format not in gptq.FORMATS:
        raise LlmqError(f"--gptq-format {gptq_format!r}: choose one of {', '.join(gptq.FORMATS)}")
    src, dest = Path(src), Path(dest)
    config, rec = record.read(src)
    mt = config.get("model_type")
    exporter, opts = EXPORTERS[to], {"gptq_format": gptq_format, "model_type": mt}
    if mt in NO_EXPERT_LAYOUT and any(moe.EXPERT_RE.match(n) for n in rec.modules):
        raise LlmqError(f"{src} cannot be exported --to {to}: {NO_EXPERT_LAYOUT[mt]}; nothing was written")
    reader = CheckpointReader(src, verify=True)
    if verify.enabled():  # no engine is handed a NaN: the values no checksum can judge, before anything is written
        codec.verify_values(reader, rec)
    _check_dest(src, dest, overwrite)
    _check_modules(exporter, rec, reader, opts, src, to)
    tmp = dest.parent / f".{dest.name}.llmq-export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        writer = CheckpointWriter(tmp, metadata=exporter.SHARD_METADATA)
        diffs = _write_tensors(exporter, rec, reader, writer, DTYPES[dtype], opts, quiet)
        for f in sorted(src.iterdir()):  # tokenizer, generation config, chat template
            if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        summary = _summary(src, Path(shown_as or dest), to, dtype, opts, rec, diffs, time.perf_counter() - t0)
        atomic_write_json(tmp / SUMMARY_NAME, {k: v for k, v in summary.items() if k != "seconds"})  # same on rerun
        atomic_write_text(tmp / "README.md", model_card(summary, exporter.serving(str(shown_as or dest))))
        model_config = record.model_config(record.without_record(config), exporter.config(rec, opts), dtype)
        writer.finish(model_config)  # shards renamed, index, then config.json last
        if dest.exists():
            shutil.rmtree(dest)  # empty, or an earlier llmq export (with --overwrite): checked above
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_dest(src: Path, dest: Path, overwrite: bool) -> None:
    if dest.resolve() == src.resolve():
        raise LlmqError(f"{dest}: the export must go to another directory than its source")
    if dest.exists() and not dest.is_dir():
        raise LlmqError(f"{dest}: exists and is not a directory; choose another destination")
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / SUMMARY_NAME).is_file():
            raise LlmqError(f"{dest}: not empty and not an llmq export; choose another destination (nothing was "
                            "written)")  # fmt: skip
        if not overwrite:
            raise LlmqError(f"{dest}: holds an earlier llmq export; pass --overwrite to replace it")


def _check_modules(exporter, rec: record.CheckpointRecord, reader: CheckpointReader, opts: dict, src: Path,
                   to: str) -> None:  # fmt: skip
    """Every module the target cannot hold, before anything is written: one error naming the first few."""
    problems = [f"{n} {why}" for n, m in rec.modules.items() if (why := exporter.why_not(m, opts))]
    model_why = getattr(exporter, "why_not_model", lambda r, o: None)(rec, opts)
    if not problems and getattr(exporter, "why_not_data", None):
        for n, m in rec.modules.items():  # only the zero points are read here: the codes wait for the write
            if m.scheme.has_zeros:  # (no module is split by row here: why_not refused those)
                key = codec.piece_prefix(n, m, 0) + "qzeros"
                zeros_only = QuantizedWeight(m.shape, m.scheme, {"qzeros": reader.load([key])[key]})
                if why := exporter.why_not_data(zeros_only, opts):
                    problems.append(f"{n} {why}")
    if model_why:
        problems.insert(0, f"the model {model_why}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LlmqError(f"{src} cannot be exported --to {to}: {problems[0]}{more}; nothing was written. "
                        f"{FOR_HINT[to]}")


def _write_tensors(exporter, rec, reader: CheckpointReader, writer: CheckpointWriter, dtype: torch.dtype, opts: dict,
                   quiet: bool) -> dict[str, float]:  # fmt: skip
    """Write every tensor in the target's layout; returns each module's largest |target − llmq| weight difference
    (both dequantized to the export dtype: 0 means bit for bit)."""
    diffs, done = {}, set()
    mt = opts.get("model_type")

    def rename(key: str) -> str:  # the family's released checkpoint names (Mixtral's experts: moe.checkpoint_name)
        return moe.checkpoint_name(mt, key) if mt else key

    for name, m in tqdm(rec.modules.items(), desc=f"export ({exporter.NAME})", unit="linear", disable=quiet):
        keys = codec.module_keys(m, reader.keys())
        qw = codec.decode(m, reader.load(keys))
        tensors = exporter.encode(name, qw, dtype, opts)
        W = exporter.dequantize(name, tensors, qw, dtype)  # what the target computes, in the export dtype
        diffs[name] = float((W.float() - qw.dequantize(dtype).float()).abs().max())
        writer.add({rename(k): v for k, v in tensors.items()})
        done |= set(keys) | {f"{name}.weight"}  # its parts, and the sentinel
    for k in reader.keys():
        if k not in done:  # biases, norms, embeddings, head
            t = reader.load([k])[k]
            writer.add({rename(k): t.to(dtype) if t.is_floating_point() else t})
    return diffs


def _summary(src: Path, dest: Path, to: str, dtype: str, opts: dict, rec, diffs: dict, secs: float) -> dict:
    changed = {n: d for n, d in diffs.items() if d > 0}
    return {"source": str(src), "dest": str(dest), "to": to, "dtype": dtype,
            **({"gptq_format": opts["gptq_format"]} if to == "gptq" else {}), "modules": len(diffs),
            "exact_modules": len(diffs) - len(changed), "max_weight_diff": max(diffs.values(), default=0.0),
            "weight_diff": changed, "scheme": rec.default.describe(), "llmq_method": rec.method,
            "seconds": round(secs, 2), "versions": versions()}  # fmt: skip


def model_card(s: dict, serving: str) -> str:
    exact = ("every dequantized weight equals llmq's dequantization bit for bit" if not s["weight_diff"] else
             f"{s['exact_modules']} of {s['modules']} modules equal llmq's dequantization bit for bit; the others hold "
             f"scales that {s['dtype']} cannot represent exactly (largest weight difference {s['max_weight_diff']:.3g}; "
             f"{SUMMARY_NAME} lists them)")  # fmt: skip
    return "\n".join([
        f"# {Path(s['source']).name}, exported for {s['to']}", "",
        f"Quantized with llmq ({s['llmq_method'].get('name')}, {s['scheme']}) and exported with `llmq export "
        f"--to {s['to']}`: llmq's own codes written into the {s['to']} layout, never re-rounded; {exact}.", "",
        f"Run it: {serving}.", ""])  # fmt: skip
