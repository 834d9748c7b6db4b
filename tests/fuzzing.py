"""A seeded fuzzer of llmq checkpoint shards, shared by tests/test_fuzz.py (a few hundred variants in CI) and
benchmarks/fuzz.py (thousands): mutate one shard's safetensors header or tensor data, load the checkpoint through a
loader, and classify what happened.

Outcomes: "error" (an LlmqError: a clean, named refusal), "equal" (it loaded, every tensor equal to the original's),
"different" (it loaded other weights), "crash" (any other exception). With verification on (the default of both
loaders) only "error" and "equal" are acceptable; with it off (LLMQ_VERIFY=0 / verify=False) a header edit that
re-points a tensor at other valid bytes of the same dtype and shape cannot be told from the original without the
checksum, so "different" is possible there and counted, and "crash" never is.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

DTYPES = ["F16", "F32", "BF16", "U8", "I8", "I16", "I32", "I64", "F64", "BOOL"]
HEADER_KINDS = ["dtype", "bad_dtype", "shape", "rank", "offsets", "swap_offsets", "drop", "rename", "swap_names",
                "metadata", "length", "flip_header", "garbage", "not_a_dict"]  # fmt: skip
DATA_KINDS = ["flip_data", "truncate", "append", "zero_range"]


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def mutate(raw: bytes, kind: str, rng: random.Random) -> bytes:
    """One mutation of the shard bytes `raw`."""
    if kind in DATA_KINDS:
        n = 8 + int.from_bytes(raw[:8], "little")
        b = bytearray(raw)
        if kind == "flip_data":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(n, len(b))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            b = b[: rng.randrange(0, len(b))]
        elif kind == "append":
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            i = rng.randrange(n, len(b))
            b[i : i + rng.randint(1, 256)] = bytes(min(256, len(b) - i))
        return bytes(b)
    if kind == "flip_header":
        n = 8 + int.from_bytes(raw[:8], "little")
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(0, n)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "length":
        n = int.from_bytes(raw[:8], "little")
        new = rng.choice([0, n - 8, n + 8, n - 1, n + 1, 2**40, len(raw), rng.randrange(0, 2**16)])
        return max(new, 0).to_bytes(8, "little") + raw[8:]
    header, data = split(raw)
    names = [k for k in header if k != "__metadata__"]
    k = rng.choice(names)
    e = header[k]
    if kind == "dtype":
        e["dtype"] = rng.choice([d for d in DTYPES if d != e["dtype"]])
    elif kind == "bad_dtype":
        e["dtype"] = rng.choice(["F8", "X32", "", "f16", 16])
    elif kind == "shape":
        if e["shape"]:
            i = rng.randrange(len(e["shape"]))
            e["shape"][i] = rng.choice([0, e["shape"][i] + 1, e["shape"][i] - 1, e["shape"][i] * 2, -1, 2**31])
        else:
            e["shape"] = [1]
    elif kind == "rank":
        e["shape"] = e["shape"][:-1] if e["shape"] and rng.random() < 0.5 else [*e["shape"], 1]
    elif kind == "offsets":
        b, en = e["data_offsets"]
        d = rng.choice([-8, -2, -1, 1, 2, 8, len(data), -b - 1])
        e["data_offsets"] = [b + d, en + d] if rng.random() < 0.5 else [b, en + d]
    elif kind == "swap_offsets":
        other = header[rng.choice(names)]
        e["data_offsets"], other["data_offsets"] = other["data_offsets"], e["data_offsets"]
    elif kind == "drop":
        del header[k]
    elif kind == "rename":
        header[k + rng.choice([".x", "_", "s"])] = header.pop(k)
    elif kind == "swap_names":
        j = rng.choice(names)
        header[k], header[j] = header[j], header[k]
    elif kind == "metadata":
        meta = header.get("__metadata__", {})
        choice = rng.randrange(4)
        if choice == 0:
            header.pop("__metadata__", None)
        elif choice == 1:
            meta["llmq_format_version"] = rng.choice(["2", "0", "x"])
        elif choice == 2:
            meta["format"] = rng.choice(["tf", "np", ""])
        else:
            meta["extra"] = "1"
        if choice:
            header["__metadata__"] = meta
    elif kind == "garbage":
        n = int.from_bytes(raw[:8], "little")
        return raw[:8] + bytes(rng.randrange(32, 127) for _ in range(n)) + data
    elif kind == "not_a_dict":
        return join(rng.choice([[1, 2], "x", 3, None]), data)
    return join(header, data)


def load(loader: str, d: Path, verify: bool):
    """The model loaded from `d` by `loader` ("load_quantized" or "from_pretrained")."""
    from transformers import AutoModelForCausalLM

    import llmq  # noqa: F401  (registers the transformers quantizer)

    if loader == "load_quantized":
        return llmq.load_quantized(d, verify=verify, backend="reference")
    old = os.environ.get("LLMQ_VERIFY")
    os.environ["LLMQ_VERIFY"] = "1" if verify else "0"
    try:
        return AutoModelForCausalLM.from_pretrained(d)
    finally:
        os.environ.pop("LLMQ_VERIFY") if old is None else os.environ.__setitem__("LLMQ_VERIFY", old)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def outcome(loader: str, d: Path, verify: bool, reference: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(error | equal | different | crash, detail) of loading `d`."""
    from llmq.errors import LlmqError

    try:
        m = load(loader, d, verify)
    except LlmqError as e:
        return "error", str(e)[:300]
    except Exception as e:  # noqa: BLE001 -- anything else is what the fuzzer is looking for
        return "crash", f"{type(e).__name__}: {str(e)[:200]}"
    got = state(m)
    same = got.keys() == reference.keys() and all(
        got[k].dtype == reference[k].dtype and got[k].shape == reference[k].shape and torch.equal(got[k], reference[k])
        for k in got
    )
    return ("equal", "") if same else ("different", "")


def variant(src: Path, work: Path, seed: int, kinds: list[str]) -> tuple[Path, str]:
    """A copy of checkpoint `src` with one shard mutated (seeded); returns (dir, the mutation's kind)."""
    rng = random.Random(seed)
    kind = rng.choice(kinds)
    d = work / f"v{seed}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    shard = rng.choice(sorted(d.glob("model-*.safetensors")))
    shard.write_bytes(mutate(shard.read_bytes(), kind, rng))
    return d, kind
