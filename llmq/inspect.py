"""`llmq inspect`: per-module scheme, size and bits per weight of a checkpoint, from file headers only."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import read_config, tensor_bytes
from .config import QuantScheme


def inspect_dir(d: Path) -> dict:
    from .modeling import module_keys, plan_from_config

    config, qc = read_config(d)
    plan = plan_from_config(qc)
    sizes = tensor_bytes(d)
    splits = qc.get("row_splits", {})
    modules, q_bytes, q_weights = [], 0, 0
    for name in qc["quantized_modules"]:
        prefix = name + "."
        parts = {k[len(prefix):]: sizes[k] for k in module_keys(name, sizes, name in splits)}
        nbytes = sum(v for k, v in parts.items() if k != "bias")
        shape = qc["shapes"][name]
        n = shape[0] * shape[1]
        if name in splits:  # per-output-row schemes: each scheme with its share of the rows
            sp = splits[name]
            schemes = [QuantScheme.from_dict(x) for x in sp["schemes"]]
            scheme = "rows: " + ", ".join(f"{s.describe()} {r}" for s, r in zip(schemes, sp["rows"]))
            short = " ".join(f"{s.bits}b{round(100 * r / shape[0])}" for s, r in zip(schemes, sp["rows"]))
        else:
            scheme = plan.scheme_for(name).describe()
            short = scheme.replace("-asym", "").replace("-clip", "")
        modules.append({"name": name, "scheme": scheme, "short": short, "shape": shape,
                        "bytes": nbytes, "bits_per_weight": round(8 * nbytes / n, 4)})  # fmt: skip
        q_bytes += nbytes
        q_weights += n
    file_bytes = sum(p.stat().st_size for p in Path(d).glob("model*.safetensors"))
    fp_bytes = sum(sizes.values()) - q_bytes
    return {
        "dir": str(d),
        "method": qc.get("method", {}).get("name"),
        "default_scheme": plan.default.describe(),
        "quantized_modules": len(modules),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight": round(8 * q_bytes / max(q_weights, 1), 4),
        "full_precision_bytes": fp_bytes,
        "file_bytes": file_bytes,
        "modules_not_converted": qc.get("modules_not_converted", []),
        "mixed": bool(plan.overrides or splits),
        "allocation": allocation(modules) if plan.overrides or splits else None,
        "modules": modules,
    }


def allocation(modules: list[dict]) -> dict:
    """Per decoder layer: {linear (relative name): scheme, short form (-asym/-clip omitted; a linear split by
    output row: each code width with its percentage of the rows, e.g. '2b21 3b70 4b9')}."""
    layers: dict[str, dict[str, str]] = {}
    for m in modules:
        head, idx, rel = _split(m["name"])
        layers.setdefault(f"{head}.{idx}" if idx is not None else head, {})[rel] = m["short"]
    return layers


def _split(name: str) -> tuple[str, int | None, str]:
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
    from .cli import human_bytes

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
