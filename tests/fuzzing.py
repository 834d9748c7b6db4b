"""A seeded fuzzer of llmq checkpoint shards, shared by tests/test_fuzz.py (a few hundred variants in CI) and
benchmarks/fuzz.py (thousands): mutate one shard's safetensors header or tensor data, load the checkpoint through a
loader, and classify what happened.

Value mutations (`value_variant`) change one tensor's numbers and recompute the shard's sha256 in the index, so the
byte checks pass and only the value checks (llmq/verify.py) stand between the mutation and the model.

Outcomes: "error" (an LlmqError: a clean, named refusal), "equal" (it loaded, every tensor equal to the original's),
"different" (it loaded other weights, every value finite), "nonfinite" (it loaded a NaN or an Inf: in a tensor or in
the logits), "crash" (any other exception). With verification on (the default of both
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
VALUE_KINDS = ["nan", "inf", "zero", "negate", "scale", "flip_bit", "copy_value", "set_int"]
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])  # the forward pass whose logits must be finite


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
    if same:
        return "equal", ""
    bad = [k for k, v in got.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    with torch.no_grad():
        if bad or not bool(torch.isfinite(m(IDS).logits).all()):
            return "nonfinite", ", ".join(bad[:3]) or "logits"
    return "different", ""


def variant(src: Path, work: Path, seed: int, kinds: list[str]) -> tuple[Path, str]:
    """A copy of checkpoint `src` with one shard mutated (seeded); returns (dir, the mutation's kind)."""
    rng, kind, d, shard = _copy_and_pick(src, work, seed, kinds)
    shard.write_bytes(mutate(shard.read_bytes(), kind, rng))
    return d, kind


def _copy_and_pick(src: Path, work: Path, seed: int, kinds: list[str]):
    """(the seeded generator, a mutation kind, a fresh copy of `src` in work/v{seed}, one of its shards)."""
    rng = random.Random(seed)
    kind = rng.choice(kinds)
    d = work / f"v{seed}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    return rng, kind, d, rng.choice(sorted(d.glob("model-*.safetensors")))


def value_mutate(t: torch.Tensor, kind: str, rng: random.Random) -> torch.Tensor:
    """A copy of `t` with one entry changed by `kind`, same dtype and shape. On an integer tensor the float kinds write
    an fp16 NaN / Inf / 0 over two bytes (where llama.cpp's block scales live in a uint8 `qweight`)."""
    t = t.clone()
    flat = t.view(-1)
    n = flat.numel()
    if n == 0:
        return t
    i = rng.randrange(n)
    if t.is_floating_point():
        v = float(flat[i])
        new = {"nan": float("nan"), "inf": rng.choice([float("inf"), float("-inf")]), "zero": 0.0, "negate": -v or -1.0,
               "scale": v * rng.choice([2.0, 1e3, 1e-3]), "copy_value": float(flat[rng.randrange(n)])}.get(kind)  # fmt: skip
        if new is not None:
            flat[i] = new
            return t
        raw = flat.view(torch.int16 if t.element_size() == 2 else torch.int32)
        if kind == "flip_bit":
            raw[i] ^= 1 << rng.randrange(8 * t.element_size() - 1)
        else:  # set_int: arbitrary bits
            raw[i] = rng.randrange(-(2 ** (8 * t.element_size() - 1)), 2 ** (8 * t.element_size() - 1))
        return t
    if kind in ("nan", "inf", "zero") and t.dtype == torch.uint8 and n >= 2:
        j = rng.randrange(n // 2) * 2
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[kind]
        flat[j : j + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8)
    elif kind == "copy_value":
        flat[i] = flat[rng.randrange(n)]  # an index duplicated (perm, CSR), a code or zero point moved in its grid
    elif kind == "flip_bit":
        flat[i] ^= 1 << rng.randrange(min(8 * t.element_size() - 1, 7))
    else:
        hi = int(flat.max()) + 2
        flat[i] = rng.choice([0, -1, hi, rng.randrange(0, hi)]) if t.dtype != torch.uint8 else rng.randrange(256)
    return t


def value_variant(src: Path, work: Path, seed: int) -> tuple[Path, str, str]:
    """A copy of checkpoint `src` with one tensor's values mutated (seeded) and its shard's sha256 recomputed in the
    index; returns (dir, the mutation's kind, the tensor's name)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from llmq.checkpoint import INDEX_NAME, sha256_file

    rng, kind, d, shard = _copy_and_pick(src, work, seed, VALUE_KINDS)
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    tensors = load_file(shard)
    name = rng.choice(sorted(k for k, v in tensors.items() if v.numel()))
    tensors[name] = value_mutate(tensors[name], kind, rng)
    save_file(tensors, shard, metadata=meta)
    index = json.loads((d / INDEX_NAME).read_text())
    index["metadata"]["llmq_sha256"][shard.name] = sha256_file(shard)
    (d / INDEX_NAME).write_text(json.dumps(index))
    return d, kind, name


def value_checkpoints(w: Path, llama_src: Path) -> list[Path]:
    """The value fuzzer's checkpoints, made in `w` (once): a tiny Qwen2 (biases) with GPTQ act-order and a stored
    perm, asymmetric int4 g32 with double-quantized scales and 1% outliers, in several shards; and the tiny Llama at
    `llama_src` in llama.cpp's Q4_0 blocks (fp16 d among the codes)."""
    from tiny import SAMPLE_TEXT, make_tiny, make_tokenizer

    from llmq.cli import main

    rich, q40 = w / "rich", w / "q40"
    if not (rich / "config.json").is_file():
        (w / "calib.txt").write_text(SAMPLE_TEXT)
        make_tiny("qwen2", vocab=300).save_pretrained(w / "qsrc")
        make_tokenizer(300).save_pretrained(w / "qsrc")
        assert main(["quantize", str(w / "qsrc"), str(rich), "--quiet", "--method", "gptq", "--calib",
                     str(w / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--bits", "4", "--group-size", "32",
                     "--double-quant", "--outliers", "0.01", "--no-static-groups", "--max-shard-size", "40KB",
                     "--overwrite"]) == 0  # fmt: skip
    if not (q40 / "config.json").is_file():
        assert main(["quantize", str(llama_src), str(q40), "--quiet", "--format", "q4_0", "--overwrite"]) == 0
    return [rich, q40]
