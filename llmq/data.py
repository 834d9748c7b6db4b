"""Text sources shared by calibration and evaluation: local files first, `datasets` names for real users.

A source is one of:
- a directory holding WikiText-style raw files (`wiki.{split}.raw`), e.g. ../shared/data/wikitext-2-raw;
- a `.txt` file (used as is) or a `.jsonl` file (the "text" field of each line, joined with "\\n\\n");
- a dataset name: wikitext2, ptb, c4 (fetched with `datasets`; needs the Hugging Face Hub). `wikitext2` is
  read from the local copy when one is found (see `find_local_wikitext`).

WikiText is joined the way the GPTQ papers do: the split's rows joined with "\\n\\n".
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LlmqError

REPO = Path(__file__).resolve().parents[1]
NAMED = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "c4": ("allenai/c4", "en", "text"),
}


def find_local_wikitext() -> Path | None:
    """LLMQ_WIKITEXT, else ../shared/data/wikitext-2-raw next to the working dir or to this repo."""
    candidates = [os.environ.get("LLMQ_WIKITEXT"), Path.cwd().parent / "shared/data/wikitext-2-raw",
                  Path.cwd() / "shared/data/wikitext-2-raw", REPO.parent / "shared/data/wikitext-2-raw"]  # fmt: skip
    for c in candidates:
        if c and any(Path(c).glob("wiki.*.raw")):
            return Path(c)
    return None


def wikitext_rows(path: Path) -> list[str]:
    """Rows of a wiki.*.raw file as the HF dataset has them (blank lines are empty rows)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def load_text(source: str | None, split: str) -> tuple[str, str]:
    """(text, a description of where it came from). `source=None` means the local WikiText-2 default."""
    local = find_local_wikitext() if source in (None, "wikitext2") else None
    if source is None:
        if local is None:
            raise LlmqError(
                "no text given and no local WikiText-2 found (looked for ../shared/data/wikitext-2-raw and "
                "$LLMQ_WIKITEXT); pass a .txt/.jsonl file or a wikitext-2-raw dir, or a dataset name "
                "(wikitext2, c4, ptb) to fetch from the Hugging Face Hub"
            )
        source = str(local)
    if source == "wikitext2" and local is not None:  # the same data, offline
        source = str(local)
    p = Path(source).expanduser()
    try:
        return _read_local(p, split) or _named(source, split)
    except UnicodeDecodeError as e:
        raise LlmqError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); give a text file") from None


def _read_local(p: Path, split: str) -> tuple[str, str] | None:
    if p.is_dir():
        f = p / f"wiki.{split}.raw"
        if not f.is_file():
            have = sorted(x.name for x in p.glob("wiki.*.raw"))
            raise LlmqError(f"{p}: no wiki.{split}.raw (has: {', '.join(have) or 'no wiki.*.raw files'})")
        return "\n\n".join(wikitext_rows(f)), f"{f} (rows joined with \\n\\n)"
    if p.is_file():
        if p.suffix == ".jsonl":
            try:
                rows = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (ValueError, KeyError, TypeError) as e:
                raise LlmqError(f"{p}: each line must be a JSON object with a 'text' field ({e})") from None
            return "\n\n".join(rows), str(p)
        text = p.read_text(encoding="utf-8")
        if "\x00" in text:
            raise LlmqError(f"{p}: a binary file (it holds NUL bytes), not text; give a text file")
        if not text.strip():
            raise LlmqError(f"{p}: the file is empty; give a text file with enough text for the windows asked")
        return text, str(p)
    return None


def _named(source: str, split: str) -> tuple[str, str]:
    if source in NAMED:
        return _from_datasets(source, split), f"datasets:{source}/{split}"
    looks_like_path = os.sep in source or "." in Path(source).name
    raise LlmqError(
        f"{source}: {'no such file or directory' if looks_like_path else 'unknown dataset name'}; "
        f"pass a .txt/.jsonl file, a wikitext-2-raw dir, or one of {', '.join(NAMED)}"
    )


def _from_datasets(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LlmqError(f"dataset {name!r} needs the `datasets` package: pip install datasets") from None
    path, cfg, field = NAMED[name]
    kwargs = {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}} if name == "c4" else {}
    split = "validation" if name == "c4" else split
    try:
        ds = datasets.load_dataset(path, None if name == "c4" else cfg, split=split, **kwargs)
    except Exception as e:  # datasets raises many types for "hub unreachable"; all mean the same to a user
        raise LlmqError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}); "
            "offline, pass a local .txt/.jsonl file or a wikitext-2-raw dir instead"
        ) from None
    rows = ds[field]
    return "\n\n".join(rows[:3000] if name == "c4" else rows)
