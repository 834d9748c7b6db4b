"""`llmq quantize`: source model -> quantized checkpoint dir, with a summary. Nothing half-written survives
a failure: the output dir is removed (or emptied) and `config.json`, written last, never appears."""
from __future__ import annotations

import dataclasses
import logging
import platform
import resource
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import atomic_write_json, prepare_output_dir
from .config import CalibConfig, GPTQConfig, QuantPlan

log = logging.getLogger("llmq")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert(a) -> dict:
    from . import sources
    from .archs import arch_for
    from .cli import human_bytes, scheme_from_args
    from .modeling import DTYPES, save_quantized
    from .pipeline import quantize

    plan = QuantPlan(scheme_from_args(a))
    gcfg = GPTQConfig(damp=a.damp, act_order=a.act_order, static_groups=a.static_groups) if a.method == "gptq" else None
    ccfg = CalibConfig(source=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, split=a.calib_split,
                       token_range=a.calib_range) if a.method == "gptq" else None  # fmt: skip
    src = sources.resolve(a.model)
    arch_for(sources.load_config(src))  # unsupported architecture: fail before any heavy work
    out = Path(a.out)
    created = prepare_output_dir(out, a.overwrite)
    try:
        t0 = time.perf_counter()
        model, _ = sources.load_model(src)
        tokenizer, why = sources.load_tokenizer(src)
        if tokenizer is None:
            log.warning("no tokenizer saved: %s", why)
        t_load = time.perf_counter() - t0
        calib = None
        if a.method == "gptq":
            from .calibration import calibration_windows

            calib = calibration_windows(ccfg, tokenizer)
        t1 = time.perf_counter()
        reports: list = []
        extra = {"reports": reports} if a.method == "gptq" else {}
        qweights = quantize(model, plan, calib, method=a.method, gptq=gcfg, quiet=a.quiet, **extra)
        t_quant = time.perf_counter() - t1
        method = {"name": a.method, **({"gptq": vars_of(gcfg), "calibration": vars_of(ccfg)} if gcfg else {})}
        q_bytes = sum(q.nbytes() for q in qweights.values())
        q_weights = sum(q.shape[0] * q.shape[1] for q in qweights.values())
        summary = {
            "llmq_version": __version__, "model": str(src), "out": str(out), "method": method,
            "scheme": plan.default.to_dict(), "scheme_name": plan.default.describe(),
            "quantized_modules": len(qweights), "quantized_weights": q_weights, "quantized_bytes": q_bytes,
            "bits_per_weight": 8 * q_bytes / max(q_weights, 1),
            "load_time_s": round(t_load, 2), "quantize_time_s": round(t_quant, 2),
            "layers": [dataclasses.asdict(r) for r in reports],
            "versions": versions(), "machine": platform.platform(),
        }  # fmt: skip
        atomic_write_json(out / "summary.json", summary)
        save_quantized(model, qweights, out, plan, method, DTYPES[a.dtype], tokenizer, a.max_shard_size)
        summary["file_bytes"] = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
        summary["total_time_s"] = round(time.perf_counter() - t0, 2)
        summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        atomic_write_json(out / "summary.json", summary)
    except BaseException:
        _discard(out, created)
        raise
    if not a.quiet:
        print(f"quantized {len(qweights)} linears of {src} with {a.method} {plan.default.describe()} "
              f"in {t_quant:.1f}s: {summary['bits_per_weight']:.3f} bits per weight, "
              f"{human_bytes(q_bytes)} quantized; {human_bytes(summary['file_bytes'])} on disk in {out}")  # fmt: skip
    return summary


def _discard(out: Path, created: bool) -> None:
    """Remove what a failed conversion wrote."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for p in out.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def vars_of(obj) -> dict:
    return dataclasses.asdict(obj)


def versions() -> dict:
    import safetensors
    import transformers

    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}  # fmt: skip
