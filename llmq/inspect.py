"""`llmq inspect`: per-module scheme, size and bits per weight of a checkpoint, from its record and the file headers
(tensor data is read only to check each shard's sha256 against the index)."""
from __future__ import annotations

from pathlib import Path

from . import codec, record
from .checkpoint import CheckpointReader
from .record import ModuleRecord
from .summary import human_bytes
from .verify import enabled as values_enabled


def short_name(m: ModuleRecord) -> str:
    """The scheme without its common parts (-asym, -clip); a module split by output row: each code width with its
    percentage of the rows, e.g. '2b21 3b70 4b9'."""
    if m.split:
        return " ".join(f"{p.scheme.bits}b{round(100 * p.shape[0] / m.shape[0])}" for p in m.pieces)
    return m.describe().replace("-asym", "").replace("-clip", "")


def inspect_dir(d: Path, verify: bool = True) -> dict:
    """The table of checkpoint `d`, after the checks every reader makes: each shard readable, the shards' headers
    holding exactly what config.json describes, and with verify (unless LLMQ_VERIFY=0) each shard's sha256 against
    the index and the values no checksum can judge (llmq/verify.py)."""
    _, rec = record.read(d)
    verify = verify and values_enabled()
    reader = CheckpointReader(d, verify=verify)
    headers = reader.headers()
    codec.check_headers(rec, headers, str(d))
    if verify:
        codec.verify_values(reader, rec)
    sizes = {k: n for k, (_, _, n) in headers.items()}
    modules, q_bytes, q_weights = [], 0, 0
    for name, m in rec.modules.items():
        nbytes = sum(sizes[k] for k in codec.module_keys(m, sizes))
        n = m.shape[0] * m.shape[1]
        modules.append({"name": name, "scheme": m.describe(), "short": short_name(m), "shape": list(m.shape),
                        "bytes": nbytes, "bits_per_weight": round(8 * nbytes / n, 4)})  # fmt: skip
        q_bytes += nbytes
        q_weights += n
    file_bytes = sum(p.stat().st_size for p in Path(d).glob("model*.safetensors"))
    fp_bytes = sum(sizes.values()) - q_bytes
    mixed = bool(rec.overrides) or any(m.split for m in rec.modules.values())
    return {
        "dir": str(d),
        "method": rec.method.get("name"),
        "default_scheme": rec.default.describe(),
        "quantized_modules": len(modules),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight": round(8 * q_bytes / max(q_weights, 1), 4),
        "full_precision_bytes": fp_bytes,
        "file_bytes": file_bytes,
        "modules_not_converted": list(rec.not_converted),
        "mixed": mixed,
        "allocation": allocation(modules) if mixed else None,
        "modules": modules,
    }


def allocation(modules: list[dict]) -> dict:
    """Per decoder layer: {linear (relative name): its short scheme name (`short_name`)}."""
    layers: dict[str, dict[str, str]] = {}
    for m in modules:
        head, idx, rel = split_name(m["name"])
        layers.setdefault(f"{head}.{idx}" if idx is not None else head, {})[rel] = m["short"]
    return layers


def split_name(name: str) -> tuple[str, int | None, str]:
    """'model.layers.3.mlp.down_proj' -> ('model.layers', 3, 'mlp.down_proj')."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p), ".".join(parts[i + 1 :])
    return name, None, ""


def print_allocation(info: dict) -> None:
    """One row per decoder layer, one column per linear, cells = scheme without the common parts."""
    alloc = info["allocation"]
    rels = list(dict.fromkeys(r for row in alloc.values() for r in row))
    short = {r: r.split(".")[-1].removesuffix("_proj") for r in rels}
    w = max([len(v) for row in alloc.values() for v in row.values()] + [len(v) for v in short.values()])
    lw = max(len(k) for k in alloc)
    print("allocation (scheme per linear; -asym/-clip omitted; 2b21 = 21% of the rows at 2 bits):")
    print(f"{'layer':<{lw}}  " + " ".join(f"{short[r]:<{w}}" for r in rels))
    for layer, row in alloc.items():
        print(f"{layer:<{lw}}  " + " ".join(f"{row.get(r, '-'):<{w}}" for r in rels))


def print_table(info: dict) -> None:
    print(f"{info['dir']}: method {info['method']}, default scheme {info['default_scheme']}"
          + (" (mixed precision: per-module schemes below)" if info.get("mixed") else ""))
    w = max((len(m["name"]) for m in info["modules"]), default=10)
    print(f"{'module':<{w}}  {'scheme':<22} {'shape':>13} {'size':>10} {'bits/w':>7}")
    for m in info["modules"]:
        shape = "x".join(map(str, m["shape"]))
        print(f"{m['name']:<{w}}  {m['scheme']:<22} {shape:>13} {human_bytes(m['bytes']):>10} {m['bits_per_weight']:>7.3f}")
    print(f"quantized: {info['quantized_modules']} modules, {info['quantized_weights']:,} weights, "
          f"{human_bytes(info['quantized_bytes'])}, {info['bits_per_weight']:.3f} bits per weight")  # fmt: skip
    print(f"full precision (embeddings, norms, head): {human_bytes(info['full_precision_bytes'])}; "
          f"files on disk: {human_bytes(info['file_bytes'])}")  # fmt: skip
    if info.get("allocation"):
        print_allocation(info)
    if info["modules_not_converted"]:
        print(f"left in full precision: {', '.join(info['modules_not_converted'])}")
