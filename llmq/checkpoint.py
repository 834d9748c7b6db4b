"""The files of a checkpoint dir (docs/FORMAT.md): atomic writes, sharded safetensors, the index, headers.

Writing is atomic at every step: each file goes to a temp name in the output dir, is fsynced and renamed.
Shards are written as they fill (`llmq-part-NNNNN.safetensors`), renamed to their final
`model-NNNNN-of-NNNNN.safetensors` names at the end, then the index and, last of all, `config.json` (replacing the
placeholder a conversion keeps there meanwhile, llmq/record.py): until then every reader refuses the dir. What config.json's
`quantization_config` says is llmq/record.py's; which tensors a quantized module stores is llmq/codec.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import verify
from .errors import LlmqError

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
PROGRESS_NAME = "llmq_progress.json"
PART_PREFIX = "llmq-part-"
SHARD_METADATA = {"format": "pt", "llmq_format_version": str(FORMAT_VERSION)}
DEFAULT_MAX_SHARD = 2 * 1024**3


# ---- atomic files -------------------------------------------------------------------------------
def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fsync_rename(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    _fsync_rename(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] = SHARD_METADATA) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _sort_metadata(tmp)
    _fsync_rename(tmp, path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted. safetensors writes them in hash-map order,
    which varies between processes; sorted, the same tensors give the same file bytes in every run (a resumed
    conversion's shards equal an uninterrupted one's, checksums included). Same length: the header is rewritten in
    place, padded with spaces as safetensors pads it."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never: same content, same compact serialization
            raise LlmqError(f"{path}: could not canonicalize the safetensors header")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- writer -------------------------------------------------------------------------------------
class CheckpointWriter:
    """Collects tensors into shards of at most `max_shard_bytes` and writes each as soon as it is full."""

    def __init__(self, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD, first_part: int = 1,
                 metadata: dict[str, str] = SHARD_METADATA):  # fmt: skip
        self.out, self.max_shard_bytes, self.metadata = Path(out), max_shard_bytes, metadata
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.next_part = first_part
        self.written: list[str] = []  # part files written so far, in order

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer `tensors` for the current shard; a float tensor must pass the readers' value check (finite, within
        verify.WEIGHT_LIMIT): llmq never writes what its own loaders would refuse, and nothing of a refused tensor is
        written."""
        for name, t in tensors.items():
            try:
                verify.finite(name, t)
            except verify.DamagedValue as e:
                raise LlmqError(f"refusing to write {name}: {e.found}, expected {e.expected} (a damaged source model, "
                                "or a bug in llmq); nothing of it was written") from None  # fmt: skip
            n = t.numel() * t.element_size()
            if self.buffer and self.buffer_bytes + n > self.max_shard_bytes:
                self.flush()
            self.buffer[name] = t.detach().cpu()
            self.buffer_bytes += n

    def flush(self) -> Path | None:
        if not self.buffer:
            return None
        path = self.out / f"{PART_PREFIX}{self.next_part:05d}.safetensors"
        atomic_save_tensors(path, self.buffer, self.metadata)
        self.written.append(path.name)
        self.buffer, self.buffer_bytes = {}, 0
        self.next_part += 1
        return path

    def written_all(self, out: Path) -> list[str]:
        """Every part file in the dir (this run's and a resumed run's earlier ones)."""
        return sorted(p.name for p in out.glob(f"{PART_PREFIX}*.safetensors"))

    def finish(self, config: dict) -> list[Path]:
        """Flush, rename parts to final shard names, write the index, then config.json (last)."""
        self.flush()
        parts = sorted(self.out.glob(f"{PART_PREFIX}*.safetensors"))
        if not parts:
            raise LlmqError(f"{self.out}: nothing was written")
        weight_map, shards, total = {}, [], 0
        for i, part in enumerate(parts, 1):
            final = self.out / f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            os.replace(part, final)
            with safe_open(final, "pt") as f:
                for k in f.keys():
                    weight_map[k] = final.name
            total += final.stat().st_size
            shards.append(final)
        digests = {s.name: sha256_file(s) for s in shards}
        version = {"llmq_format_version": FORMAT_VERSION} if "llmq_format_version" in self.metadata else {}
        index = {
            "metadata": {"total_size": total, **version, "llmq_sha256": digests},
            "weight_map": dict(sorted(weight_map.items())),
        }
        atomic_write_json(self.out / INDEX_NAME, index)
        atomic_write_json(self.out / "config.json", config)
        return shards


# ---- reader -------------------------------------------------------------------------------------
def read_index(d: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(tensor name -> shard file, shard file -> sha256 as the index records it) of a dir of safetensors: from
    model.safetensors.index.json, or a single model.safetensors; ({}, {}) when there is neither. Every listed
    shard must exist."""
    d = Path(d)
    index_path = d / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map, digests = dict(index["weight_map"]), dict(index.get("metadata", {}).get("llmq_sha256", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LlmqError(f"{index_path}: unreadable index ({e}); re-copy or re-quantize the model") from None
    elif (d / "model.safetensors").is_file():
        weight_map, digests = {k: "model.safetensors" for k in tensor_headers(d / "model.safetensors")}, {}
    else:
        return {}, {}
    for shard in sorted(set(weight_map.values())):
        if not (d / shard).is_file():
            raise LlmqError(f"{d / shard}: shard listed in the index is missing; re-copy or re-quantize the model")
    return weight_map, digests


SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                      "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F32": torch.float32, "F64": torch.float64}  # fmt: skip


def tensor_headers(path: Path) -> dict[str, tuple[torch.dtype | None, tuple[int, ...], int]]:
    """name -> (dtype, shape, bytes) of every tensor in one safetensors file, from its header alone (no data is
    read); dtype None for a dtype llmq never stores."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        out = {}
        for k, v in header.items():
            if k != "__metadata__":
                begin, end = v["data_offsets"]
                out[k] = (SAFETENSORS_DTYPES.get(v["dtype"]), tuple(int(x) for x in v["shape"]), int(end) - int(begin))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlmqError(f"{path}: unreadable safetensors header ({e}); the file is truncated or corrupted") from None


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint dir, by name, one shard open at a time."""

    def __init__(self, d: Path, verify: bool = False):
        self.dir = Path(d)
        self.weight_map, digests = read_index(self.dir)
        if not self.weight_map:
            raise LlmqError(f"{self.dir}: no {INDEX_NAME} or model.safetensors; not a complete checkpoint")
        for shard in sorted(set(self.weight_map.values())):
            path = self.dir / shard
            with self._open(shard) as f:
                meta = f.metadata() or {}
                if meta.get("llmq_format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
                    raise LlmqError(
                        f"{path}: llmq format version {meta['llmq_format_version']}, expected {FORMAT_VERSION}"
                    )
            if verify and shard in digests and sha256_file(path) != digests[shard]:
                raise LlmqError(f"{path}: checksum mismatch, the file is corrupted; re-copy or re-quantize the model")

    def _open(self, shard: str):
        try:
            return safe_open(self.dir / shard, "pt")
        except (SafetensorError, OSError) as e:
            raise LlmqError(f"{self.dir / shard}: unreadable safetensors file ({e}); it is truncated or corrupted") from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def headers(self) -> dict[str, tuple[torch.dtype | None, tuple[int, ...], int]]:
        """name -> (dtype, shape, bytes) of every tensor of the checkpoint, from the shard headers."""
        out = {}
        for shard in sorted(set(self.weight_map.values())):
            out |= tensor_headers(self.dir / shard)
        return out

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by name, grouped so that each shard is opened once."""
        by_shard: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise LlmqError(f"{self.dir}: tensor {n!r} is missing from the checkpoint")
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, ns in by_shard.items():
            with self._open(shard) as f:
                for n in ns:
                    try:
                        out[n] = f.get_tensor(n)
                    except SafetensorError as e:
                        raise LlmqError(f"{self.dir / shard}: cannot read tensor {n!r} ({e})") from None
        return out


def tensor_bytes(d: Path) -> dict[str, int]:
    """Bytes each tensor occupies in the shard files of dir `d`, read from the safetensors headers only."""
    out = {}
    for shard in sorted(Path(d).glob("model*.safetensors")):
        out |= {k: n for k, (_, _, n) in tensor_headers(shard).items()}
    return out
