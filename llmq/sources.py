"""Open the model a user names: a Hugging Face model dir, a hub id, or a `.gguf` file.

Checks happen before anything heavy, so a wrong path or a model that is not a causal LM fails at once
with a one-line message.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlmqError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Source:
    kind: str  # "dir", "gguf" or "hub"
    path: str  # dir or hub id; for gguf the containing dir
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve(spec: str) -> Source:
    p = Path(spec).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise LlmqError(f"{spec}: not a GGUF file (no GGUF magic); pass a model dir, a hub id or a .gguf file")
        return Source("gguf", str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LlmqError(f"{spec}: no config.json in this directory; it is not a Hugging Face model dir")
        return Source("dir", str(p))
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or os.sep in spec and Path(spec.split(os.sep)[0]).exists():
        raise LlmqError(f"{spec}: no such file or directory; pass a model dir, a hub id or a .gguf file")
    return Source("hub", spec)


POSITION_KEYS = ("max_position_embeddings", "n_positions")  # how configs name the model's maximum positions


def config_positions(config) -> int | None:
    """The maximum positions of a transformers config object (None when it has none)."""
    return next((n for n in (getattr(config, k, None) for k in POSITION_KEYS) if n), None)


def check_seqlen(seqlen: int, positions: int | None) -> None:
    """A window longer than the model's positions gives nonsense (or an index error): refuse it, naming the flag."""
    if positions is not None and seqlen > positions:
        raise LlmqError(f"--seqlen {seqlen} is longer than the model's {positions} positions (max_position_embeddings); "
                        f"use --seqlen {positions} or less")  # fmt: skip


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def max_positions(src: Source) -> int | None:
    """The model's maximum positions, cheaply (before the config is parsed: for a .gguf, transformers reads the whole
    header, tokenizer included, which takes seconds): config.json's max_position_embeddings / n_positions, or the
    GGUF's {arch}.context_length; None when not found this way."""
    try:
        if src.kind == "gguf":
            return _gguf_context_length(Path(src.path, src.gguf_file))
        cfg = json.loads((Path(src.path) / "config.json").read_text())
        n = next((cfg[k] for k in POSITION_KEYS if cfg.get(k)), None)
        return n if isinstance(n, int) else None
    except (OSError, ValueError, KeyError, struct.error):  # an unknown value type too: the config's check follows
        return None


def _gguf_context_length(path: Path) -> int | None:
    """{arch}.context_length from a GGUF header, read key by key until found (the tokenizer's arrays come later)."""
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode()

        def skip(t):
            if t == 8:  # string
                f.seek(read("<Q"), 1)
            elif t != 9:
                f.seek(struct.calcsize(_GGUF_SCALARS[t]), 1)
            else:  # array: element type, count, elements
                et, n = read("<I"), read("<Q")
                if et in (8, 9):
                    for _ in range(n):
                        skip(et)
                else:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[et]), 1)

        if f.read(4) != b"GGUF":
            return None
        read("<I")
        read("<Q")
        for _ in range(read("<Q")):
            key, t = string(), read("<I")
            if key.endswith(".context_length") and t in _GGUF_SCALARS:
                return int(read(_GGUF_SCALARS[t]))
            skip(t)
    return None


@contextlib.contextmanager
def gguf_parsed_once(src: Source):
    """Within the block, a .gguf source's header is parsed once. transformers parses the whole file anew for the
    config, for the tokenizer and for the weights (~3 s each for SmolLM2's 49k-token vocabulary), and builds gguf's
    tensor-name map once per module of the model (~400 times, ~4 s): here the reader is kept per path and the map
    per (arch, layers). Both are read-only once built. Other sources: nothing changes."""
    if src.kind != "gguf":
        yield
        return
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_config(src: Source):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(src.path, **src.kwargs())
    except OSError as e:
        hint = " (no network? pass a local model dir or .gguf file)" if src.kind == "hub" else ""
        raise LlmqError(f"{src}: cannot read the model config{hint}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise LlmqError(f"{src}: cannot read the model config: {str(e).splitlines()[0]}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal.intersection(archs)):
        raise LlmqError(
            f"{src}: a {config.model_type!r} model ({', '.join(archs) or 'no architectures listed'}) is not a causal LM; "
            "llmq quantizes decoder-only language models (Llama, Mistral, Qwen2, GPT-2, OPT, ...)"
        )
    return config


def load_model(src: Source, dtype: torch.dtype = torch.float32):
    """(model, config) with weights in `dtype` on the CPU."""
    from transformers import AutoModelForCausalLM

    with gguf_parsed_once(src):
        config = load_config(src)
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **src.kwargs())
        except OSError as e:
            raise LlmqError(f"{src}: cannot load the weights: {str(e).splitlines()[0]}") from None
    return model.eval(), config


def load_tokenizer(src: Source):
    """The model's tokenizer, or None (with the reason) when it has none, e.g. a bare test model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, **src.kwargs()), None
    except (OSError, ValueError, TypeError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
