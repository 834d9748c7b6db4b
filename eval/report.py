"""`llmq report`: eval records -> a markdown comparison table and PNG plots.

Plots: perplexity vs bits per weight (one marker per method; full precision as a dashed line, since it
has no quantized bits per weight), and bars of file size and eval throughput per run.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmq.errors import LlmqError

MARKERS = {"rtn": "o", "gptq": "s", "fp": "*", "mixed": "D"}


def load_records(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise LlmqError(f"{p}: not a readable eval record ({e})") from None
        if not isinstance(r, dict) or "perplexity" not in r:
            raise LlmqError(f"{p}: no 'perplexity' field; pass files written by `llmq eval --json`")
        check_record(r, p)
        out.append(r)
    hashes = {r["dataset"]["sha256"] for r in out}
    if len(hashes) > 1:
        raise LlmqError("the records were measured on different texts (dataset sha256 differ); compare like with like")
    return out


NUM = (int, float)
# field -> (types, required): what the table and the plots read from a record
FIELDS = {"perplexity": (NUM, True), "label": (str, True), "tokens_scored": (int, True), "dataset": (dict, True),
          "protocol": (dict, True), "bits_per_weight": (NUM, False), "file_bytes": (NUM, False),
          "tokens_per_s": (NUM, False), "method": (str, False), "kind": (str, False)}  # fmt: skip
NESTED = {"dataset": {"sha256": str, "name": str, "split": str, "tokens": int},
          "protocol": {"seqlen": int, "stride": int}}  # fmt: skip


def check_record(r: dict, p) -> None:
    """Every field the report reads, with its type: one clear error instead of a traceback from the plots."""
    def bad(field, want, v):
        names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        raise LlmqError(f"{p}: field {field!r} is {type(v).__name__} {v!r:.40}, expected {names}; pass files "
                        "written by `llmq eval --json`")  # fmt: skip

    for k, (types, required) in FIELDS.items():
        v = r.get(k)
        if v is None:
            if required:
                raise LlmqError(f"{p}: no {k!r} field; pass files written by `llmq eval --json`")
            continue
        if not isinstance(v, types) or isinstance(v, bool):
            bad(k, types, v)
    for k, sub in NESTED.items():
        for f, t in sub.items():
            v = r[k].get(f)
            if not isinstance(v, t) or isinstance(v, bool):
                bad(f"{k}.{f}", t, v)


def markdown_table(records: list[dict]) -> str:
    fp = next((r for r in records if r.get("kind") == "fp"), None)
    lines = ["| run | method | perplexity | Δ vs fp | bits/weight | size (MB) | eval tok/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in records:
        delta = f"{r['perplexity'] - fp['perplexity']:+.3f}" if fp and r is not fp else "-"
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
        size = f"{r['file_bytes'] / 1e6:.1f}" if r.get("file_bytes") else "-"
        lines.append(f"| {r['label']} | {r.get('method', '-')} | {r['perplexity']:.3f} | {delta} | {bpw} | {size} | "
                     f"{r.get('tokens_per_s', 0):.0f} |")  # fmt: skip
    d, p = records[0]["dataset"], records[0]["protocol"]
    lines += ["", f"Dataset: {d['name']} {d['split']} (sha256 `{d['sha256'][:16]}…`, {d['tokens']:,} tokens); "
              f"seqlen {p['seqlen']}, stride {p['stride']}, {records[0]['tokens_scored']:,} tokens scored per run; "
              "bits/weight counts every stored byte of the quantized linears."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Annotate points so that no two labels overlap: each label takes the first of a few offsets around its point
    whose box (estimated in display pixels) is clear of the labels and points placed before it."""
    fig = ax.figure
    fig.tight_layout()  # the final axes position: the boxes are computed in its pixels
    fig.canvas.draw()
    px = fontsize * fig.dpi / 72
    taken = [(x - 4, y - 4, x + 4, y + 4) for x, y in (ax.transData.transform((a, b)) for a, b, _ in points)]
    offsets = [(sx * 5, dy) for k in range(4) for dy in (3 + k * (px + 2), -px - 3 - k * (px + 2)) for sx in (1, -1)]
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        X, Y = ax.transData.transform((x, y))
        w = 0.6 * px * len(text)
        for dx, dy in offsets:
            box = (X + dx - (w if dx < 0 else 0), Y + dy, X + dx + (0 if dx < 0 else w), Y + dy + px)
            inside = 0 <= box[0] and box[2] <= fig.bbox.width
            if inside and not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                break
        taken.append(box)
        ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset pixels",
                    ha="right" if dx < 0 else "left", va="bottom")  # fmt: skip


def plot_ppl_vs_bpw(records: list[dict], path: Path, title: str | None = None) -> None:
    """`title`: what was evaluated (default: the records' text, window length and tokens scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = []
    for method in sorted({r.get("method") or "?" for r in records if r.get("bits_per_weight")}):
        rs = [r for r in records if r.get("bits_per_weight") and (r.get("method") or "?") == method]
        ax.scatter([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], marker=MARKERS.get(method, "^"),
                   s=50, label=method, zorder=3)  # fmt: skip
        points += [(r["bits_per_weight"], r["perplexity"], r["label"]) for r in rs]
    for r in records:
        if r.get("kind") == "fp":
            ax.axhline(r["perplexity"], ls="--", color="gray", label=f"{r['label']} (full precision)")
    d = records[0]["dataset"]
    ax.set_xlabel("bits per weight (quantized linears, all metadata counted)")
    ax.set_ylabel(f"perplexity, {d['name']} {d['split']} (lower is better)")
    if title is None and records[0].get("protocol") and records[0].get("tokens_scored"):
        title = f"seqlen {records[0]['protocol']['seqlen']}, {records[0]['tokens_scored']:,} tokens scored"
    ax.set_title("Quality vs size" + (f" ({title})" if title else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _place_labels(ax, points)
    fig.savefig(path)
    plt.close(fig)


def plot_size_speed(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a .gguf source's file is itself quantized (e.g. Q4_1): say so next to its size
    labels = [r["label"] + (" [file: quantized .gguf]" if r.get("source_format") == "gguf" else "") for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, max(3, 0.35 * len(records) + 1.5)), dpi=120)
    a1.barh(labels, [(r.get("file_bytes") or 0) / 1e6 for r in records], color="tab:blue")
    a1.set_xlabel("checkpoint size on disk (MB)")
    a1.set_title("Size")
    a2.barh(labels, [r.get("tokens_per_s", 0) for r in records], color="tab:green")
    a2.set_xlabel("eval throughput (tokens/s, prefill)")
    a2.set_title("Speed")
    for a in (a1, a2):
        a.invert_yaxis()
        a.grid(axis="x", alpha=0.3)
        a.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(paths: list[Path], out: Path) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise LlmqError(f"--out {out}: is a file; give a directory for report.md and the plots")
    records = load_records(paths)
    out.mkdir(parents=True, exist_ok=True)
    md, p1, p2 = out / "report.md", out / "ppl_vs_bpw.png", out / "size_speed.png"
    md.write_text("# llmq comparison\n\n" + markdown_table(records) + f"\n![]({p1.name})\n\n![]({p2.name})\n")
    plot_ppl_vs_bpw(records, p1)
    plot_size_speed(records, p2)
    return [md, p1, p2]
