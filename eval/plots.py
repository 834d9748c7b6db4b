"""`llmq inspect DIR --plot LAYER`: what a format does to one layer's real weight distribution.

Three panels: (1) the weights in grid units — w / s + z for integer grids, w / s for NF4 — with the grid
points drawn over the histogram, so the spacing of the grid is seen against the density it must cover;
(2) original vs dequantized weights; (3) the relative error of each group (rows × groups).
The original weights come from the source model recorded in summary.json, or from `source`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmq import codec, record, sources
from llmq.archs import arch_for, weight_of
from llmq.checkpoint import CheckpointReader
from llmq.errors import LlmqError
from llmq.formats import grouping
from llmq.inspect import split_name


def original_weight(source: str, name: str) -> torch.Tensor:
    """The full-precision weight [out, in] of module `name` in the source model."""
    src = sources.resolve(source)
    if src.kind == "dir":
        for f in sorted(Path(src.path).glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                if f"{name}.weight" in st.keys():
                    W = st.get_tensor(f"{name}.weight").float()
                    return W.t() if arch_for(sources.load_config(src)).transposed else W
    model, config = sources.load_model(src)
    return weight_of(model.get_submodule(name), arch_for(config)).detach().float()


def plot_layer(d: Path, name: str, out: Path, source: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, rec = record.read(d)
    if name not in rec.modules:
        close = [m for m in rec.modules if name in m][:5]
        raise LlmqError(f"{name!r} is not a quantized module of {d}" + (f"; did you mean {close}?" if close else ""))
    m = rec.modules[name]
    if m.split:
        raise LlmqError(f"{name} is quantized per output row with {len(m.pieces)} schemes ({m.describe()}); --plot "
                        "shows a module quantized whole")  # fmt: skip
    scheme = m.scheme
    reader = CheckpointReader(d)
    qw = codec.decode(m, reader.load(codec.module_keys(m, reader.keys())))
    if source is None:
        summary = d / "summary.json"
        if not summary.is_file():
            raise LlmqError(f"{d}: no summary.json naming the source model; pass --source MODEL")
        source = json.loads(summary.read_text())["model"]
    W = original_weight(source, name)
    if qw.perm is not None:
        W = W[:, qw.perm.long()]  # compare in stored column order
    shape = tuple(W.shape)
    Wh = qw.dequantize_stored()
    s = grouping.expand(qw.scales(), shape, scheme.group_size)
    z = qw.zeros()
    book = scheme.number_format.codebook
    if book is not None:
        u, grid, unit = W / s, sorted(set(book.tolist())), f"w / absmax ({scheme.format.upper()} codebook)"
    else:
        zz = grouping.expand(z, shape, scheme.group_size) if z is not None else 2 ** (scheme.bits - 1)
        u, grid, unit = W / s + zz, list(range(scheme.maxq + 1)), "w / scale + zero (integer codes)"
    Wg, mask = grouping.to_groups((Wh - W).square(), scheme.group_size)
    Ng, _ = grouping.to_groups(W.square(), scheme.group_size)
    rel = (Wg.sum(-1) / Ng.sum(-1).clamp_min(1e-30)).sqrt()  # [Rs, G]

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    ax[0].hist(u.flatten().numpy(), bins=200, color="tab:blue", alpha=0.8)
    for g in grid:
        ax[0].axvline(g, color="tab:red", lw=0.6, alpha=0.7)
    ax[0].set_xlabel(unit)
    ax[0].set_ylabel("weights")
    ax[0].set_title(f"weights in grid units; red = {len(grid)} grid points")
    lim = W.abs().quantile(0.999).item() * 1.2
    bins = torch.linspace(-lim, lim, 201).numpy()
    ax[1].hist(W.flatten().numpy(), bins=bins, alpha=0.6, label="original")
    ax[1].hist(Wh.flatten().numpy(), bins=bins, alpha=0.6, label="dequantized")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("weight value")
    ax[1].set_ylabel("weights (log)")
    ax[1].legend()
    ax[1].set_title("distribution before / after")
    im = ax[2].imshow(rel.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax[2], label="‖ŵ − w‖ / ‖w‖ per group")
    ax[2].set_xlabel("group (input columns)")
    ax[2].set_ylabel("output row")
    ax[2].set_title(f"relative error per group (mean {rel.mean():.3f})")
    fig.suptitle(f"{name}: {scheme.describe()}, {qw.bits_per_weight():.3f} bits/weight, shape {list(shape)}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_allocation(info: dict, out: Path) -> Path:
    """Heat map of a mixed checkpoint's allocation: decoder layer × linear, colour = measured bits per weight,
    text = scheme. `info` is llmq.inspect.inspect_dir's output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, rels, bpw, label = [], [], {}, {}
    for m in info["modules"]:
        head, idx, rel = split_name(m["name"])
        key = f"{idx}" if idx is not None else head
        rows.append(key) if key not in rows else None
        rels.append(rel) if rel not in rels else None
        bpw[key, rel] = m["bits_per_weight"]
        label[key, rel] = m.get("short", m["scheme"]).replace("-asym", "").replace("-clip", "").replace("int", "i")
    grid = np.full((len(rows), len(rels)), np.nan)
    for (r, c), v in bpw.items():
        grid[rows.index(r), rels.index(c)] = v
    fig, ax = plt.subplots(figsize=(1.4 * len(rels) + 2.5, 0.28 * len(rows) + 1.6), dpi=110)
    # a fixed scale, whole bits apart at least: a 0.03 bpw spread must not look like 2 bits against 8
    lo, hi = np.floor(np.nanmin(grid)), np.ceil(np.nanmax(grid))
    lo, hi = (lo, hi) if hi - lo >= 2 else (lo - 1, lo + 2)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
    for (r, c), t in label.items():
        ax.text(rels.index(c), rows.index(r), t, ha="center", va="center", fontsize=6,
                color="white" if bpw[r, c] < (lo + hi) / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(rels)), [r.split(".")[-1] for r in rels], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{Path(info['dir']).name}: scheme per linear, {info['bits_per_weight']:.3f} bits per weight overall")
    fig.colorbar(im, ax=ax, label="bits per weight (all metadata counted)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
