"""`llmq quantize`: source model -> quantized checkpoint dir, streamed layer by layer, resumable.

Flow: open the source lazily (lazy.py) -> [GPTQ: capture layer-0 inputs] -> for each decoder layer: read it,
quantize it, write its tensors to a part file, record it in the manifest (progress.py), release it -> write
the embeddings / norm / head -> index -> config.json (last). A failure keeps the finished layers: rerunning
the same command resumes; nothing is ever left that loads as a complete model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import CheckpointWriter, atomic_write_json, atomic_write_text
from .config import CalibConfig, GPTQConfig, QuantPlan
from .errors import LlmqError
from .progress import Progress

log = logging.getLogger("llmq")
CRASH_ENV = "LLMQ_TEST_KILL_AFTER_LAYER"  # tests: SIGKILL this process right after layer N is recorded
BIG_TENSOR = 64 << 20  # bytes: embeddings / heads above this get a part file of their own


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB.

    On Linux this is the kernel's high-water mark of this process's own address space (VmHWM), not
    getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a conversion started from a big
    parent (a benchmark script, pytest, a notebook) would report the parent's size (measured: a 16 MB
    child of a 1.5 GB parent reported 1513 MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def versions() -> dict:
    import safetensors
    import transformers

    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}  # fmt: skip


def _args_record(a, src, plan, gcfg, ccfg) -> dict:
    """Everything that changes the output: the resume fingerprint is taken over this."""
    calib = dataclasses.asdict(ccfg) if ccfg else None
    if calib and calib["source"] and Path(calib["source"]).exists():
        calib["source"] = str(Path(calib["source"]).resolve())
    return {"model": str(src), "method": a.method, "scheme": plan.default.to_dict(),
            "gptq": dataclasses.asdict(gcfg) if gcfg else None, "calibration": calib, "dtype": a.dtype,
            "max_shard_size": a.max_shard_size, "device": a.device, "llmq": __version__,
            **({"target_bpw": a.target_bpw, "candidates": list(a.candidates)} if a.target_bpw else {}),
            **({"granularity": "row"} if getattr(a, "granularity", "linear") == "row" else {})}  # fmt: skip


def _read_layer(out: Path, parts: list[str], modules: dict, plan: QuantPlan) -> dict:
    """The QuantizedWeights of a finished layer, read back from its part files."""
    from .qtensor import QuantizedWeight, RowSplitWeight

    tensors = {}
    for p in parts:
        with safe_open(out / p, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    qw = {}
    for name, facts in modules.items():
        pre = name + "."
        own = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre) and k[len(pre):] not in ("bias", "weight")}
        if name in plan.row_splits:
            qw[name] = RowSplitWeight.from_tensors(own, facts["shape"], list(plan.row_splits[name].schemes), name)
        else:
            qw[name] = QuantizedWeight.from_tensors(own, facts["shape"], plan.scheme_for(name), name)
    return qw


def convert(a) -> dict:
    from . import sources
    from .archs import arch_for, decoder_layers
    from .cli import human_bytes, scheme_from_args
    from .lazy import LazyModel
    from .modeling import DTYPES, linear_names, module_facts, quantization_config, sentinel_tensor, stored_tensors
    from .pipeline import (LayerReport, advance, gptq_layer, install_dequantized, log_layer, rtn_layer,
                           start_activations)  # fmt: skip

    plan = QuantPlan(scheme_from_args(a))
    gptq = a.method == "gptq"
    mixed = a.target_bpw is not None
    gcfg = GPTQConfig(damp=a.damp, act_order=a.act_order, static_groups=a.static_groups,
                      inputs=a.gptq_inputs) if gptq else None  # fmt: skip
    ccfg = CalibConfig(source=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, split=a.calib_split,
                       token_range=a.calib_range) if gptq or mixed else None  # fmt: skip
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError(f"--device {a.device}: CUDA is not available on this machine; use --device cpu")
    dtype = DTYPES[a.dtype]
    src = sources.resolve(a.model)
    config = sources.load_config(src)
    spec = arch_for(config)  # unsupported architecture: fail before any heavy work
    out = Path(a.out)
    prog = Progress.open(out, _args_record(a, src, plan, gcfg, ccfg), a.overwrite)
    t0 = time.perf_counter()
    try:
        lazy = LazyModel(src, config, spec)
        model = lazy.model
        tokenizer, why = sources.load_tokenizer(src)
        if tokenizer is None:
            log.warning("no tokenizer saved: %s", why)
        acts = alloc = None
        calib = None
        if ccfg is not None:
            from .calibration import calibration_windows

            calib = calibration_windows(ccfg, tokenizer)
        if mixed or gptq:
            lazy.load_rest(head=mixed)  # embeddings for calibration (all of the model for the sensitivity pass)
        if mixed:
            plan, alloc = _mixed_plan(a, lazy, calib, gcfg, out)
        if gptq:
            acts = start_activations(model, spec, calib, a.device or "cpu",
                                     "cpu" if a.offload_activations else (a.device or "cpu"))  # fmt: skip
        lazy.release_rest()  # not needed again until they are written
        del calib
        t_load = time.perf_counter() - t0
        writer = CheckpointWriter(out, a.max_shard_size, first_part=prog.next_part)
        n_layers = len(decoder_layers(model, spec))
        bar = tqdm(range(n_layers), desc=f"quantize ({a.method})", unit="layer", disable=a.quiet)
        for i in bar:
            layer = lazy.layer(i)
            if i in prog.layers:  # finished before an interruption
                if gptq:  # the next layer's inputs: through the quantized layer, or the fp one (inputs="fp")
                    if gcfg.inputs == "quantized":
                        install_dequantized(layer, i, spec, _read_layer(out, prog.layers[i]["parts"],
                                                                        prog.layers[i]["modules"], plan))  # fmt: skip
                    advance(layer, acts)
                lazy.release(i)
                continue
            t1 = time.perf_counter()
            if gptq:
                q, rep = gptq_layer(layer, i, spec, plan, gcfg, acts)
            else:
                q = rtn_layer(layer, i, spec, plan)
                rep = LayerReport(i, time.perf_counter() - t1, None, {n: w.bits_per_weight() for n, w in q.items()})
            state = {f"{spec.layers}.{i}.{k}": v for k, v in layer.state_dict().items()}
            first = len(writer.written)
            writer.add(stored_tensors(state, q, dtype))
            writer.flush()
            prog.layer_done(i, writer.written[first:], writer.next_part, {n: module_facts(w) for n, w in q.items()},
                            dataclasses.asdict(rep))  # fmt: skip
            log_layer(rep, bar, a.quiet)
            del q, state
            lazy.release(i)
            if os.environ.get(CRASH_ENV) == str(i):
                os.kill(os.getpid(), signal.SIGKILL)
        facts = {n: f for i in sorted(prog.layers) for n, f in prog.layers[i]["modules"].items()}
        lazy.load_rest(dtype)  # in the storage dtype: no full-precision copy of the embeddings and head
        rest = stored_tensors(_unique_nonlayer_state(model, spec), {}, dtype)
        writer.add(sentinel_tensor(next(iter(facts))))
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
            tokenizer.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        method = {"name": a.method, **({"gptq": dataclasses.asdict(gcfg), "calibration": prog.args["calibration"]}
                                       if gptq else {}),
                  **({"mixed": alloc_summary(alloc)} if alloc else {})}  # fmt: skip
        q_bytes = sum(f["bytes"] for f in facts.values())
        q_weights = sum(f["shape"][0] * f["shape"][1] for f in facts.values())
        summary = {
            "llmq_version": __version__, "model": str(src), "out": str(out), "method": method,
            "scheme": plan.default.to_dict(), "scheme_name": plan.default.describe() + (" (mixed)" if alloc else ""),
            "arguments": prog.args,
            "streamed": lazy.streamed, "quantized_modules": len(facts), "quantized_weights": q_weights,
            "quantized_bytes": q_bytes, "bits_per_weight": 8 * q_bytes / max(q_weights, 1),
            "load_time_s": round(t_load, 2), "layers": [prog.layers[i]["report"] for i in sorted(prog.layers)],
            "versions": versions(), "machine": platform.platform(),
        }  # fmt: skip
        cfg = model.config.to_dict()
        cfg["dtype"] = a.dtype
        not_conv = [n for n in linear_names(model) if n not in facts]
        cfg["quantization_config"] = quantization_config(plan, facts, not_conv, method)
        writer.flush()
        summary["file_bytes"] = sum((out / p).stat().st_size for p in writer.written_all(out))
        summary["total_time_s"] = round(time.perf_counter() - t0, 2)
        summary["quantize_time_s"] = round(sum(r["seconds"] for r in summary["layers"] if r), 2)
        summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "README.md", model_card(summary))
        writer.finish(cfg)  # shards renamed, index, then config.json last
        prog.finish()
    except BaseException as e:
        _on_failure(out, prog, e)
        raise
    if not a.quiet:
        print(f"quantized {len(facts)} linears of {src} with {a.method} {plan.default.describe()} in "
              f"{summary['total_time_s']:.1f}s: {summary['bits_per_weight']:.3f} bits per weight, "
              f"{human_bytes(q_bytes)} quantized; {human_bytes(summary['file_bytes'])} on disk in {out}")  # fmt: skip
    return summary


SENSITIVITY_NAME = "sensitivity.json"
ROW_DAMAGE_NAME = "sensitivity_rows.safetensors"  # --granularity row: the damage of every output row


def _mixed_plan(a, lazy, calib, gcfg, out: Path):
    """--target-bpw: measure every linear's sensitivity to every candidate scheme on the full-precision model
    (held whole in memory for the backward pass), then allocate. The table and allocation are kept in
    OUT/sensitivity.json; a resumed conversion reads them back instead of measuring again."""
    import json

    from .allocate import allocate, allocate_rows, plan_for, row_plan
    from .archs import decoder_layers
    from .config import scheme_from_name
    from .sensitivity import SensitivityTable, layer_stats, sensitivity_table

    rows = getattr(a, "granularity", "linear") == "row"
    path, rows_path = out / SENSITIVITY_NAME, out / ROW_DAMAGE_NAME
    if path.is_file() and (rows_path.is_file() or not rows):
        table = SensitivityTable.from_dict(json.loads(path.read_text())["table"])
        if rows:
            from safetensors.torch import load_file

            flat = load_file(rows_path)
            table.row_damage = {}
            for key, v in flat.items():
                lin, _, scheme = key.rpartition("/")
                table.row_damage.setdefault(lin, {})[scheme] = v
        log.info("sensitivity: reusing %s", path)
    else:
        base = {"clip_search": a.clip_search, "scale_dtype": a.scale_dtype, "sym": a.sym}
        candidates = {n: scheme_from_name(n, **base) for n in a.candidates}
        n = len(decoder_layers(lazy.model, lazy.spec))
        for i in range(n):
            lazy.layer(i)
        stats = layer_stats(lazy.model, calib, a.quiet)
        table = sensitivity_table(lazy.model, stats, candidates, a.method, gcfg, a.quiet, rows=rows)
        del stats
        for i in range(n):
            lazy.release(i)
        if rows:  # before sensitivity.json: that file's presence means the measurement is complete
            from .checkpoint import atomic_save_tensors

            flat = {f"{lin}/{s}": d for lin, ds in table.row_damage.items() for s, d in ds.items()}
            atomic_save_tensors(rows_path, flat)
    if rows:
        alloc = allocate_rows(table.row_damage, table.row_shapes(), table.schemes, a.target_bpw)
        record = {k: v for k, v in alloc.to_dict().items() if k not in ("names", "part")} | {"rows": alloc.counts()}
        plan = row_plan(alloc, table.schemes)
    else:
        alloc = allocate(table.damage, table.nbytes, table.weights, a.target_bpw)
        record = alloc.to_dict()
        plan = plan_for(alloc.choice, table.schemes)
    atomic_write_json(path, {"target_bpw": a.target_bpw, "allocation": record, "table": table.to_dict()})
    log.info("mixed precision: %.4f bits per weight (target %g), estimated loss increase %.4f nats; %s",
             alloc.bits_per_weight, a.target_bpw, alloc.damage, _counts(alloc))  # fmt: skip
    return plan, alloc


def _counts(alloc) -> str:
    from collections import Counter

    if hasattr(alloc, "counts"):  # per row
        return ", ".join(f"{s}: {k} rows" for s, k in alloc.counts().items())
    return ", ".join(f"{s}: {k}" for s, k in Counter(alloc.choice.values()).most_common())


def alloc_summary(alloc) -> dict:
    return {"bits_per_weight": round(alloc.bits_per_weight, 4), "estimated_loss_increase": alloc.damage,
            "budget_bytes": alloc.budget_bytes, "used_bytes": alloc.used_bytes, "schemes": _counts(alloc)}  # fmt: skip


def _unique_nonlayer_state(model, spec) -> dict:
    from .modeling import _unique_state

    return {k: v for k, v in _unique_state(model).items() if not k.startswith(spec.layers + ".")}


def _on_failure(out: Path, prog: Progress, e: BaseException) -> None:
    """Keep finished layers for a resume; remove a dir that holds nothing worth resuming."""
    import shutil

    if not prog.layers:
        if prog.created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for p in out.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    (out / "config.json").unlink(missing_ok=True)  # never look complete
    log.warning("llmq: %d finished layer(s) kept in %s; rerun the same command to resume", len(prog.layers), out)
    if isinstance(e, OSError) and e.errno == 28:
        raise LlmqError(f"{out}: no space left on device; free space, then rerun the same command to resume") from None


def model_card(s: dict) -> str:
    sch = s["scheme"]
    calib = s["method"].get("calibration")
    lines = [
        f"# {Path(s['model']).name} quantized with llmq", "",
        f"Quantized with [llmq](https://pypi.org/project/llmq/) {s['llmq_version']}: method **{s['method']['name']}**, "
        f"scheme **{s['scheme_name']}** ({sch['bits']}-bit {sch['format']}, group size {sch['group_size']}, "
        f"{'symmetric' if sch['sym'] else 'asymmetric'}{', double-quantized scales' if sch['double_quant'] else ''}"
        f"{', clip search' if sch['clip_search'] else ''}{', %g%% outliers in fp16' % (100 * sch['outliers']) if sch['outliers'] else ''}).",
        "", f"- Measured bits per weight of the quantized linears (all metadata counted): **{s['bits_per_weight']:.3f}**",
        f"- Quantized linears: {s['quantized_modules']} ({s['quantized_weights']:,} weights)",
        f"- Calibration: {calib['nsamples']} × {calib['seqlen']} tokens from {calib['source'] or 'local WikiText-2'} "
        f"({calib['split']} split, seed {calib['seed']})" if calib else "- Calibration: none (round-to-nearest)",
        f"- Source: `{s['model']}`", "", "## Use", "", "```python",
        "import llmq  # registers the loader", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", "",
        "Without `import llmq`, transformers refuses this checkpoint (it does not know the packed format).", "",
    ]  # fmt: skip
    return "\n".join(lines)
