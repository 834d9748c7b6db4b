"""What a conversion reports: sizes in words, versions, peak memory, the summary.json record and the model card."""
from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path

import safetensors
import torch
import transformers

from .version import __version__


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB.

    On Linux this is the kernel's high-water mark of this process's own address space (VmHWM), not getrusage's
    ru_maxrss: Linux carries ru_maxrss across fork + exec, so a conversion started from a big parent (a benchmark
    script, pytest, a notebook) would report the parent's size (benchmarks/results/notes.md)."""
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
    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}  # fmt: skip


def machine() -> str:
    return platform.platform()


def model_card(s: dict) -> str:
    """README.md of a converted model, from its summary."""
    sch = s["scheme"]
    calib = s["method"].get("calibration")
    extra = "".join(t for t, on in ((", double-quantized scales", sch["double_quant"]),
                                    (", clip search", sch["clip_search"])) if on)  # fmt: skip
    if sch["outliers"]:
        extra += ", %g%% outliers in fp16" % (100 * sch["outliers"])
    lines = [
        f"# {Path(s['model']).name} quantized with llmq", "",
        f"Quantized with [llmq](https://pypi.org/project/llmq/) {s['llmq_version']}: method **{s['method']['name']}**, "
        f"scheme **{s['scheme_name']}** ({sch['bits']}-bit {sch['format']}, group size {sch['group_size']}, "
        f"{'symmetric' if sch['sym'] else 'asymmetric'}{extra}).",
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
