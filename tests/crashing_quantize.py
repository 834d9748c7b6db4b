"""`llmq quantize` that SIGKILLs itself right after decoder layer N is on disk and recorded: what a crash at that
point leaves behind. Usage: python tests/crashing_quantize.py N MODEL OUT [llmq quantize flags...]

N may also be `L:experts:K`: killed as the K-th expert linear of layer L starts its solve (in the middle of that
layer's experts, nothing of layer L on disk yet); or `L:refine:K`: killed at the K-th loss the learned rounding of
layer L computes (its scoring of the windows first, then one per training step).

Under torchrun (or any launch that sets RANK), only the rank named by LLMQ_TEST_CRASH_RANK (default 0) dies."""
import os
import signal
import sys

from llmq.cli import build_parser, cmd_quantize


def _mine() -> bool:
    return os.environ.get("RANK", "0") == os.environ.get("LLMQ_TEST_CRASH_RANK", "0")


def kill_after(n: int):
    def on_layer_done(i: int) -> None:
        if i == n and _mine():
            os.kill(os.getpid(), signal.SIGKILL)

    return on_layer_done


def kill_in_experts(layer: int, k: int) -> None:
    from llmq.pipeline import experts

    real, seen = experts.quantize_linear, [0]

    def counting(W, H, plan, name, cfg=None):
        if f".layers.{layer}." in name:
            seen[0] += 1
            if seen[0] == k and _mine():
                os.kill(os.getpid(), signal.SIGKILL)
        return real(W, H, plan, name, cfg)

    experts.quantize_linear = counting


def kill_in_refine(layer: int, k: int) -> None:
    from llmq.pipeline import layer as layer_mod
    from llmq.pipeline import refine

    real_refine, real_loss, now, seen = layer_mod.refine_layer, refine._loss, [-1], [0]

    def refine_layer(lay, i, *a, **kw):
        now[0] = i
        return real_refine(lay, i, *a, **kw)

    def loss(y, t):
        if now[0] == layer:
            seen[0] += 1
            if seen[0] == k and _mine():
                os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(y, t)

    layer_mod.refine_layer, refine._loss = refine_layer, loss


if __name__ == "__main__":
    args = build_parser().parse_args(["quantize", *sys.argv[2:]])
    where = sys.argv[1]
    if ":refine:" in where:
        layer, _, k = where.split(":")
        kill_in_refine(int(layer), int(k))
        cmd_quantize(args)
    elif ":experts:" in where:
        layer, _, k = where.split(":")
        kill_in_experts(int(layer), int(k))
        cmd_quantize(args)
    else:
        cmd_quantize(args, on_layer_done=kill_after(int(where)))
