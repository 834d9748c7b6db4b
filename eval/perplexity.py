"""Perplexity with the GPTQ papers' protocol, and a sliding-window variant.

Protocol (default): the text (WikiText-2: test rows joined with "\\n\\n") is tokenized once without
special tokens (no BOS); the first ⌊T / seqlen⌋ non-overlapping windows of `seqlen` tokens are run
through the model, and every position that has a next token inside its window is scored: seqlen - 1
predictions per window. Perplexity = exp(mean NLL over all scored tokens).

With `stride` < seqlen, windows start every `stride` tokens (window [b, b + seqlen) for every b with
b + seqlen ≤ T) and each scores only the tokens not scored by an earlier window, so every scored token
has at least seqlen - stride tokens of context. stride = seqlen is the default protocol exactly.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmq.calibration import tokenize_text
from llmq.data import load_text
from llmq.errors import LlmqError


@dataclass(frozen=True)
class Window:
    begin: int  # window covers tokens[begin : begin + seqlen]
    first_scored: int  # absolute index of the first token scored in it


def windows(n_tokens: int, seqlen: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise LlmqError(f"stride={stride} must be in 1..seqlen ({seqlen})")
    if n_tokens < seqlen + (0 if seqlen > 1 else 1):
        raise LlmqError(
            f"the text has {n_tokens:,} tokens, fewer than one window of seqlen={seqlen}; use a longer text or a "
            "smaller --seqlen"
        )
    out, scored_to = [], 0
    for b in range(0, n_tokens - seqlen + 1, stride):
        out.append(Window(b, max(b + 1, scored_to)))
        scored_to = b + seqlen
        if max_windows and len(out) == max_windows:
            break
    return out


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, stride: int | None = None,
               max_windows: int | None = None, batch_size: int = 1, device=None, quiet: bool = True) -> dict:  # fmt: skip
    """tokens [T] int64 -> {perplexity, nll, tokens_scored, windows, seconds, tokens_per_s}."""
    device = torch.device(device) if device else next(model.parameters()).device
    wins = windows(len(tokens), seqlen, stride, max_windows)
    nll_sum, n_scored = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(wins), desc="perplexity", unit="window", disable=quiet)
    for k in range(0, len(wins), batch_size):
        batch = wins[k : k + batch_size]
        ids = torch.stack([tokens[w.begin : w.begin + seqlen] for w in batch]).to(device)  # [B, L]
        logits = model(ids, use_cache=False).logits  # [B, L, V]
        for j, w in enumerate(batch):
            s = w.first_scored - w.begin  # first scored position inside the window (>= 1)
            pred = logits[j, s - 1 : seqlen - 1].float()  # predictions for positions s..L-1
            nll_sum += F.cross_entropy(pred, ids[j, s:], reduction="sum").item()
            n_scored += seqlen - s
        bar.update(len(batch))
    bar.close()
    secs = time.perf_counter() - t0
    nll = nll_sum / n_scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens_scored": n_scored, "windows": len(wins),
            "seconds": round(secs, 2), "tokens_per_s": round(len(wins) * seqlen / secs, 1)}  # fmt: skip


def perplexity_of_model(model, tokenizer, source: str | None, split: str = "test", seqlen: int = 2048,
                        max_tokens: int | None = None, **kw) -> dict:  # fmt: skip
    """Convenience: load the text, tokenize it, score the first `max_tokens` tokens (None = all)."""
    text, _ = load_text(source, split)
    tokens = tokenize_text(tokenizer, text)
    max_windows = max_tokens // seqlen if max_tokens else None
    return perplexity(model, tokens, seqlen, max_windows=max_windows, **kw)
