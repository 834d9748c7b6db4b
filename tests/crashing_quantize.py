"""`llmq quantize` that SIGKILLs itself right after decoder layer N is on disk and recorded: what a crash at that
point leaves behind. Usage: python tests/crashing_quantize.py N MODEL OUT [llmq quantize flags...]

Under torchrun (or any launch that sets RANK), only the rank named by LLMQ_TEST_CRASH_RANK (default 0) dies."""
import os
import signal
import sys

from llmq.cli import build_parser, cmd_quantize


def kill_after(n: int):
    def on_layer_done(i: int) -> None:
        if i == n and os.environ.get("RANK", "0") == os.environ.get("LLMQ_TEST_CRASH_RANK", "0"):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_layer_done


if __name__ == "__main__":
    args = build_parser().parse_args(["quantize", *sys.argv[2:]])
    cmd_quantize(args, on_layer_done=kill_after(int(sys.argv[1])))
