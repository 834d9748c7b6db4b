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
        if "perplexity" not in r:
            raise LlmqError(f"{p}: no 'perplexity' field; pass files written by `llmq eval --json`")
        out.append(r)
    hashes = {r["dataset"]["sha256"] for r in out}
    if len(hashes) > 1:
        raise LlmqError("the records were measured on different texts (dataset sha256 differ); compare like with like")
    return out


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


def plot_ppl_vs_bpw(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in sorted({r.get("method") or "?" for r in records if r.get("bits_per_weight")}):
        rs = [r for r in records if r.get("bits_per_weight") and (r.get("method") or "?") == method]
        ax.scatter([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], marker=MARKERS.get(method, "^"),
                   s=50, label=method, zorder=3)  # fmt: skip
        for r in rs:
            ax.annotate(r["label"], (r["bits_per_weight"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
    for r in records:
        if r.get("kind") == "fp":
            ax.axhline(r["perplexity"], ls="--", color="gray", label=f"{r['label']} (full precision)")
    d = records[0]["dataset"]
    ax.set_xlabel("bits per weight (quantized linears, all metadata counted)")
    ax.set_ylabel(f"perplexity, {d['name']} {d['split']} (lower is better)")
    ax.set_title("Quality vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_size_speed(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in records]
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
    records = load_records(paths)
    out.mkdir(parents=True, exist_ok=True)
    md, p1, p2 = out / "report.md", out / "ppl_vs_bpw.png", out / "size_speed.png"
    md.write_text("# llmq comparison\n\n" + markdown_table(records) + f"\n![]({p1.name})\n\n![]({p2.name})\n")
    plot_ppl_vs_bpw(records, p1)
    plot_size_speed(records, p2)
    return [md, p1, p2]
