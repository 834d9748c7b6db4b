"""Calibration data: `nsamples` windows of `seqlen` tokens drawn (seeded) from a text source.

As in the GPTQ reference code: the whole text is tokenized once, and windows start at uniformly drawn
positions (they may overlap). `token_range` restricts the draw to a fraction of the token stream, which
keeps calibration and evaluation text disjoint when only one split exists locally.
"""
from __future__ import annotations

import logging

import torch

from .config import CalibConfig
from .data import load_text
from .errors import LlmqError

log = logging.getLogger("llmq")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All tokens of `text`, [T] int64, without special tokens (no BOS)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def draw_windows(tokens: torch.Tensor, cfg: CalibConfig) -> torch.Tensor:
    """[nsamples, seqlen] windows from the token_range part of tokens; an error when it is shorter than N×L."""
    lo, hi = int(len(tokens) * cfg.token_range[0]), int(len(tokens) * cfg.token_range[1])
    avail = hi - lo
    if avail < cfg.nsamples * cfg.seqlen:
        part = f" in token_range {cfg.token_range}" if cfg.token_range != (0.0, 1.0) else ""
        raise LlmqError(
            f"calibration text has {avail:,} tokens{part}, fewer than nsamples × seqlen = "
            f"{cfg.nsamples} × {cfg.seqlen} = {cfg.nsamples * cfg.seqlen:,}; use a longer text, or lower "
            "--nsamples / --seqlen"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(lo, hi - cfg.seqlen + 1, (cfg.nsamples,), generator=g)
    return torch.stack([tokens[s : s + cfg.seqlen] for s in starts.tolist()])


def check_enough_text(text: str, cfg: CalibConfig) -> None:
    """Before any tokenizer loads: a text of fewer bytes than nsamples × seqlen cannot hold that many tokens (a token
    is at least one byte in byte-level BPE and SentencePiece alike)."""
    lo, hi = cfg.token_range
    n = int(len(text.encode("utf-8")) * (hi - lo))
    if n < cfg.nsamples * cfg.seqlen:
        part = f" in token_range {cfg.token_range}" if cfg.token_range != (0.0, 1.0) else ""
        raise LlmqError(f"calibration text has {n:,} bytes{part}, fewer than the nsamples × seqlen = {cfg.nsamples} × "
                        f"{cfg.seqlen} = {cfg.nsamples * cfg.seqlen:,} tokens asked; use a longer text, or lower "
                        "--nsamples / --seqlen")  # fmt: skip


def calibration_windows(cfg: CalibConfig, tokenizer, text: tuple[str, str] | None = None) -> torch.Tensor:
    """[nsamples, seqlen] int64 token windows for `cfg`; `text`: (text, where) when already read (load_text)."""
    if tokenizer is None:
        raise LlmqError("calibration needs the model's tokenizer, and none was found next to the model")
    text, where = text or load_text(cfg.source, cfg.split)
    tokens = tokenize_text(tokenizer, text)
    log.info("calibration: %d × %d tokens from %s (%s tokens, range %s)", cfg.nsamples, cfg.seqlen, where,
             f"{len(tokens):,}", cfg.token_range)  # fmt: skip
    return draw_windows(tokens, cfg)
