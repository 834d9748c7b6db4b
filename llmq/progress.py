"""The output dir of `llmq quantize`: preparing it, and its resume manifest (which layers are finished, in which
part files, under which arguments).

`llmq_progress.json` in the output dir is rewritten atomically after each finished layer, *after* that
layer's part files are on disk. On a rerun with the same arguments (same fingerprint) the conversion skips
finished layers; part files not listed (written by a layer that did not finish) are deleted. Different
arguments are refused unless --overwrite. The manifest is removed once config.json is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import PART_PREFIX, PROGRESS_NAME, atomic_write_json
from .errors import LlmqError
from .record import ModuleRecord, is_llmq_dir

log = logging.getLogger("llmq")


def prepare_output_dir(out: Path, overwrite: bool) -> bool:
    """Make `out` ready for a fresh conversion; True when this call created it."""
    if out.exists() and not out.is_dir():
        raise LlmqError(f"{out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        if not is_llmq_dir(out):  # --overwrite would not help: llmq never deletes a directory it did not write
            raise LlmqError(f"{out}: not empty and not an llmq output; choose another (new or empty) output directory")
        if not overwrite:
            raise LlmqError(f"{out}: holds an earlier llmq output; pass --overwrite to replace it, or choose another")
        shutil.rmtree(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".llmq-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LlmqError(f"{out}: cannot write to the output directory ({e.strerror}); check the path and permissions") from None
    return created


def fingerprint(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Progress:
    out: Path
    fingerprint: str
    args: dict
    layers: dict[int, dict] = field(default_factory=dict)  # index -> {"parts": [...], "modules": {...}, "report": {...}}
    # "modules": name -> ModuleRecord.to_dict(), "report": pipeline.LayerReport as a dict
    next_part: int = 1
    created: bool = False

    @property
    def path(self) -> Path:
        return self.out / PROGRESS_NAME

    @classmethod
    def open(cls, out: Path, args: dict, overwrite: bool) -> "Progress":
        """Resume the conversion in `out` if it was started with the same arguments, else start afresh."""
        fp = fingerprint(args)
        manifest = out / PROGRESS_NAME
        if manifest.is_file() and not overwrite:
            try:
                m = json.loads(manifest.read_text())
            except ValueError:
                raise LlmqError(f"{manifest}: unreadable progress file; pass --overwrite to start over") from None
            if m.get("fingerprint") != fp:
                diff = sorted(k for k in set(m.get("args", {})) | set(args) if m.get("args", {}).get(k) != args.get(k))
                raise LlmqError(
                    f"{out} holds an interrupted conversion made with different arguments ({', '.join(diff)}); rerun "
                    "that exact command to resume it, or pass --overwrite to start over"
                )
            p = cls(out, fp, args, {int(k): v for k, v in m["layers"].items()}, m["next_part"])
            listed = {part for v in p.layers.values() for part in v["parts"]}
            for f in out.glob(f"{PART_PREFIX}*"):
                if f.name not in listed:
                    f.unlink()  # written by a layer that did not finish
            for f in out.glob(".*.tmp"):
                f.unlink()
            log.info("resuming: %d of the layers are finished", len(p.layers))
            return p
        if manifest.is_file() and overwrite:
            shutil.rmtree(out)
        p = cls(out, fp, args, created=prepare_output_dir(out, overwrite))
        p.save()
        return p

    def save(self) -> None:
        atomic_write_json(self.path, {"fingerprint": self.fingerprint, "args": self.args, "next_part": self.next_part,
                                      "layers": {str(k): v for k, v in sorted(self.layers.items())}})  # fmt: skip

    def layer_done(self, i: int, parts: list[str], next_part: int, modules: dict[str, ModuleRecord],
                   report: dict | None) -> None:  # fmt: skip
        self.layers[i] = {"parts": parts, "modules": {n: m.to_dict() for n, m in modules.items()}, "report": report}
        self.next_part = next_part
        self.save()

    def modules(self, i: int | None = None) -> dict[str, ModuleRecord]:
        """The records of the quantized modules of finished layer i (None: of every finished layer), in order."""
        layers = sorted(self.layers) if i is None else [i]
        return {n: ModuleRecord.from_dict(n, d) for k in layers for n, d in self.layers[k]["modules"].items()}

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
