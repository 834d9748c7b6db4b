"""Does a learned rotation (SpinQuant's Cayley optimisation) pay on top of the fused Hadamard one? An experiment.

    python benchmarks/learned_rotation.py [--steps 100] [--lr 0.05] [--train-windows 8] [--train-seqlen 512]
        [--schemes int3-g128] [--draws 0 1] [--out learned_rotation] [--render results/learned_rotation.json]

SpinQuant (Liu et al. 2024) learns the residual-stream rotation R1 on calibration data: the loss is the next-token
cross-entropy of the model whose linears are fake-quantized (here RTN, asymmetric min-max, straight-through
gradients) after the rotation, and R1 stays orthogonal through Cayley SGD steps
R <- (I + a/2 A)^-1 (I - a/2 A) R with A = G R^T - R G^T (G = dL/dR), normalised (|A|_F = 1: lr bounds the
rotation per step; unnormalised steps at SpinQuant's lr 1.5 raised the loss here, 7.2 -> 9.2 in 6 steps). Here: SmolLM2, fp32; first the randomized
Hadamard rotation of `llmq.rotate_model` (norms folded), then R' (init I) learned on top of it: readers W R',
writers R'^T W, embeddings and head rotated alike (not quantized). Training windows come from the second half of
WikiText-2 test (another draw, seed 100, from the half the GPTQ calibration draws from; never the evaluation half).
Then R' is fused (float64) and the model is quantized and scored with benchmarks/rotation.py's protocol (GPTQ:
the CLI's default recipe, 16 x 512 calibration, draws 0 and 1; RTN; 4 evaluation windows of 2048), beside the
Hadamard-only and unrotated models, in the same process.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, machine, machine_line, write_results  # noqa: E402
from rotation import SCHEMES  # noqa: E402

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITERS = ("o_proj", "down_proj")


def fake_quant(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """RTN min-max asymmetric per group of input columns, straight-through."""
    R, C = W.shape
    G = W.reshape(R, C // group, group)
    mn, mx = G.amin(-1, keepdim=True), G.amax(-1, keepdim=True)
    scale = (mx - mn).clamp(min=1e-8) / (2**bits - 1)
    zero = torch.round(-mn / scale)
    q = torch.clamp(torch.round(G / scale) + zero, 0, 2**bits - 1)
    return W + ((q - zero) * scale).reshape(R, C).sub(W).detach()


def rotated_params(model, R: torch.Tensor, fq=None):
    """(name, tensor) of every parameter R changes, in R's dtype: readers W R, writers R^T W (fake-quantized by `fq`
    when given), embeddings and head E R."""
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 2)[-2] if n.endswith(".weight") else ""
        if mod in READERS or mod in WRITERS:
            w = p.to(R.dtype) @ R if mod in READERS else R.t() @ p.to(R.dtype)
            yield n, fq(w) if fq else w
        elif n.endswith("embed_tokens.weight") or n.endswith("lm_head.weight"):
            yield n, p.to(R.dtype) @ R


def learn(model, windows: torch.Tensor, steps: int, lr: float, bits: int, group: int) -> tuple[torch.Tensor, list]:
    from torch.func import functional_call

    for p in model.parameters():
        p.requires_grad_(False)
    n = model.config.hidden_size
    R = torch.eye(n, dtype=torch.float64)
    I = torch.eye(n, dtype=torch.float64)
    log = []
    for step in range(steps):
        ids = windows[step % len(windows)].unsqueeze(0)
        Rg = R.to(torch.float32).requires_grad_(True)
        params = dict(rotated_params(model, Rg, lambda w: fake_quant(w, bits, group)))
        logits = functional_call(model, params, (ids,), {"use_cache": False}).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        G = Rg.grad.to(torch.float64)
        A = G @ R.t() - R @ G.t()
        A = A / A.norm().clamp(min=1e-12)  # a step of `lr` radians at most, whatever the gradient's scale
        R = torch.linalg.solve(I + lr / 2 * A, (I - lr / 2 * A) @ R)
        log.append(round(loss.item(), 4))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, |R R^T - I| {float((R @ R.t() - I).abs().max()):.1e}",
                  flush=True)  # fmt: skip
    return R, log


@torch.no_grad()
def fuse(model, R: torch.Tensor) -> None:
    """R into the weights, in float64, rounded once (Llama's writers have no bias)."""
    for n, w in rotated_params(model, R):
        p = model.get_parameter(n)
        p.copy_(w.to(p.dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.05, help="rotation per step (the skew generator normalised)")
    ap.add_argument("--train-windows", type=int, default=8)
    ap.add_argument("--train-seqlen", type=int, default=512)
    ap.add_argument("--train-bits", type=int, default=3)
    ap.add_argument("--train-group", type=int, default=64, help="fake-quant group while learning (divides 576, 1536)")
    ap.add_argument("--schemes", nargs="*", default=["int3-g128"])
    ap.add_argument("--draws", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--out", default="learned_rotation")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table from a results JSON")
    a = ap.parse_args()
    if a.render:
        payload = json.loads(Path(a.render).read_text())
        for p in write_results(a.out, payload, table(payload)):
            print("wrote", p)
        return 0
    from llmq import rotate_model, sources
    from llmq.calibration import draw_windows, tokenize_text
    from llmq.config import CalibConfig, GPTQConfig, QuantScheme
    from llmq.data import load_text
    from llmq.eval.perplexity import perplexity
    from llmq.modeling import fake_quantize
    from llmq.pipeline import quantize

    m = machine()
    src = sources.resolve(a.model or default_model())
    fp, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    tokens = tokenize_text(tok, load_text(None, "test")[0])
    eval_tokens = tokens[: a.eval_windows * 2048]
    had = copy.deepcopy(fp)
    rotate_model(had, "hadamard", seed=0)
    train = draw_windows(tokens, CalibConfig(nsamples=a.train_windows, seqlen=a.train_seqlen, seed=100,
                                             split="test", token_range=(0.5, 1.0)))  # fmt: skip
    t0 = time.perf_counter()
    learned = copy.deepcopy(had)
    R, losses = learn(learned, train, a.steps, a.lr, a.train_bits, a.train_group)
    fuse(learned, R)
    learn_s = time.perf_counter() - t0
    models = {"none": fp, "hadamard": had, "learned": learned}
    rows = [{"name": f"fp {k}", "perplexity": perplexity(mdl, eval_tokens, 2048)["perplexity"]} for k, mdl in models.items()]
    print(rows, flush=True)
    for scheme in a.schemes:
        for method in ("rtn", "gptq"):
            for rot, mdl in models.items():
                for d in a.draws if method == "gptq" else [None]:
                    q = copy.deepcopy(mdl)
                    calib = None if d is None else draw_windows(tokens, CalibConfig(
                        nsamples=a.nsamples, seqlen=a.seqlen, seed=d, split="test", token_range=(0.5, 1.0)))  # fmt: skip
                    qs = QuantScheme(**SCHEMES[scheme], clip_search=method == "gptq")
                    qw = quantize(q, qs, calib, method=method, gptq=GPTQConfig() if calib is not None else None)
                    fake_quantize(q, qw)
                    row = {"name": f"{method} {scheme} {rot}" + ("" if d is None else f" d{d}"),
                           "perplexity": perplexity(q, eval_tokens, 2048)["perplexity"]}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    del q, qw
    payload = {"machine": m, "settings": vars(a), "learn_seconds": learn_s, "losses": losses, "rows": rows}
    for p in write_results(a.out, payload, table(payload)):
        print("wrote", p)
    return 0


def table(payload: dict) -> str:
    a, rows, losses = argparse.Namespace(**payload["settings"]), payload["rows"], payload["losses"]
    by = {r["name"]: r["perplexity"] for r in rows}
    f0 = by["fp none"]
    what = " ".join(next(p for p in __doc__.split("\n\n") if p.startswith("SpinQuant")).split())
    md = ["# A learned rotation (SpinQuant's Cayley SGD) on top of the Hadamard one", "", machine_line(payload["machine"]),
          "", what, "",
          f"Learning: {a.steps} steps, lr {a.lr}, {a.train_windows} x {a.train_seqlen} training tokens, int"
          f"{a.train_bits} g{a.train_group} fake quantization: {payload['learn_seconds'] / 60:.1f} min on this CPU (one "
          f"thread); loss {losses[0]:.3f} -> {min(losses[-10:]):.3f} (last 10 steps' best).", "",
          f"Full precision: none {f0:.4f}, Hadamard {by['fp hadamard']:.4f}, learned {by['fp learned']:.4f}.", "",
          "Perplexity (GPTQ: mean of the draws, each in brackets); the last column is the learned rotation's increase "
          "over full precision divided by the Hadamard one's (< 1: learning pays).", "",
          "| scheme | method | none | Hadamard | learned | learned excess / Hadamard excess |",
          "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for scheme in a.schemes:
        for method in ("rtn", "gptq"):
            def cell(rot):
                names = [f"{method} {scheme} {rot}"] if method == "rtn" else [f"{method} {scheme} {rot} d{d}" for d in a.draws]
                mean = sum(by[n] for n in names) / len(names)
                each = "" if method == "rtn" else " (" + ", ".join(f"{by[n]:.2f}" for n in names) + ")"
                return mean, f"{mean:.3f}{each}"

            p = {rot: cell(rot) for rot in ("none", "hadamard", "learned")}
            md.append(f"| {scheme} | {method} | {p['none'][1]} | {p['hadamard'][1]} | {p['learned'][1]} | "
                      f"{(p['learned'][0] - f0) / (p['hadamard'][0] - f0):.2f} |")  # fmt: skip
    return "\n".join(md) + "\n"

if __name__ == "__main__":
    raise SystemExit(main())
