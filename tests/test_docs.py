"""Every code block of README.md and docs/*.md marked `run` (```bash run, ```python run) is executed, in order, page
by page in one working dir, on a tiny model: MODEL is a tiny random-init Llama with a tokenizer, CALIB a text long
enough for the default calibration (128 x 2048 tokens). Blocks that need what this machine lacks (a GPU, a second
machine, an engine) are written as ```text and say so. README.md stays at most 150 lines."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT, make_tiny, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of the page's blocks marked run."""
    return [(m[1], m[3]) for m in FENCE.finditer(page.read_text()) if "run" in m[2].split()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    model = root / "tiny-llama"
    make_tiny("llama", vocab=300, max_position_embeddings=4096).save_pretrained(model)
    make_tokenizer(300).save_pretrained(model)
    (root / "calib.txt").write_text(SAMPLE_TEXT * 40)
    return root, {**os.environ, "MODEL": str(model), "CALIB": str(root / "calib.txt"), "OMP_NUM_THREADS": "2",
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


def test_readme_is_short_and_every_page_runs_something():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    assert all(blocks(p) for p in PAGES), [p.name for p in PAGES if not blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs(page, env):
    """A page's blocks build on each other (a checkpoint, then its export): one test, in order, in one dir."""
    root, environ = env
    cwd = root / page.stem
    cwd.mkdir()
    for i, (lang, code) in enumerate(blocks(page)):
        cmd = {"bash": ["bash", "-euo", "pipefail", "-c", code], "python": [sys.executable, "-c", code]}[lang]
        p = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
        out = f"--- stdout\n{p.stdout[-2000:]}\n--- stderr\n{p.stderr[-3000:]}"
        assert p.returncode == 0, f"{page.name} block {i}:\n{code}\n{out}"
