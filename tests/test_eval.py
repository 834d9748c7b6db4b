"""The perplexity harness against an independent naive loop, its variants, the report, and bad input."""
import json
import math

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny, make_tokenizer
from llmq.eval.perplexity import perplexity, windows

from llmq.cli import main
from llmq.errors import LlmqError


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer(300)
    model = make_tiny("llama", vocab=300)
    tokens = torch.tensor(tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])
    return model, tokens


def naive_ppl(model, tokens, L):
    """One window at a time, plain CrossEntropyLoss: the definition, written independently."""
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(tokens) // L):
            ids = tokens[i * L : (i + 1) * L].unsqueeze(0)
            logits = model(ids).logits[0]
            total += loss_fn(logits[:-1], ids[0, 1:]).item()
            count += L - 1
    return math.exp(total / count), count


def naive_sliding(model, tokens, L, stride):
    """Hugging Face's sliding-window recipe: each window scores only its new tokens."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for b in range(0, len(tokens) - L + 1, stride):
            ids = tokens[b : b + L].unsqueeze(0)
            labels = ids.clone()
            new = b + L - max(prev_end, b + 1)
            labels[0, : L - new] = -100
            logits = model(ids).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += new
            prev_end = b + L
    return math.exp(total / count), count


@pytest.mark.parametrize("L", [32, 100])
def test_matches_naive_loop(tiny, L):
    model, tokens = tiny
    ref, count = naive_ppl(model, tokens, L)
    r = perplexity(model, tokens, L)
    assert r["tokens_scored"] == count
    assert r["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_stride_and_batch_do_not_change_non_overlapping(tiny):
    model, tokens = tiny
    base = perplexity(model, tokens, 64)["perplexity"]
    assert perplexity(model, tokens, 64, stride=64)["perplexity"] == pytest.approx(base, rel=1e-5)
    for bs in (2, 3, 8):
        assert perplexity(model, tokens, 64, batch_size=bs)["perplexity"] == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("stride", [16, 48])
def test_sliding_matches_naive(tiny, stride):
    model, tokens = tiny
    ref, count = naive_sliding(model, tokens, 64, stride)
    r = perplexity(model, tokens, 64, stride=stride)
    assert r["tokens_scored"] == count and r["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_windows_bad_input():
    with pytest.raises(LlmqError, match="fewer than one window of seqlen=2048"):
        windows(100, 2048)
    with pytest.raises(LlmqError, match="stride=4096"):
        windows(10000, 2048, stride=4096)
    assert len(windows(10000, 2048, max_windows=2)) == 2


def test_reproduces_reference_on_smollm2(real_model_path, wikitext):
    """../shared/models/.../SOURCE.md: fp, first 20,480 tokens, seqlen 2048 -> 19.922."""
    from llmq.eval.perplexity import perplexity_of_model

    from llmq import sources

    src = sources.resolve(str(real_model_path))
    model, _ = sources.load_model(src)
    tok, _ = sources.load_tokenizer(src)
    r = perplexity_of_model(model, tok, str(wikitext), seqlen=2048, max_tokens=20480)
    assert r["windows"] == 10
    assert abs(r["perplexity"] - 19.922) < 0.01, r


# ---- CLI, report, bad input ---------------------------------------------------------------------
def test_eval_cli_report_and_plots(tiny_dir, sample_text, tmp_path, capsys):
    from matplotlib.image import imread

    src = tiny_dir("llama", tokenizer=True)
    records = []
    for label, args in (("fp", None), ("int4", ["--bits", "4"]), ("int3", ["--bits", "3", "--group-size", "32"])):
        model = src
        if args:
            model = tmp_path / label
            assert main(["quantize", str(src), str(model), "--quiet", *args]) == 0
        rec = tmp_path / f"{label}.json"
        assert main(["eval", str(model), "--dataset", str(sample_text), "--seqlen", "64", "--label", label,
                     "--json", str(rec), "--quiet"]) == 0  # fmt: skip
        records.append(rec)
    r = json.loads(records[1].read_text())
    for key in ("model", "method", "scheme", "bits_per_weight", "file_bytes", "dataset", "protocol", "tokens_scored",
                "perplexity", "nll", "seconds", "tokens_per_s", "peak_rss_mb", "versions", "date"):  # fmt: skip
        assert key in r, key
    assert r["kind"] == "llmq" and 4 < r["bits_per_weight"] < 5 and len(r["dataset"]["sha256"]) == 64
    assert main(["report", *map(str, records), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| int3 |" in md and "Δ vs fp" in md
    for png in ("ppl_vs_bpw.png", "size_speed.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(tmp_path / "rep" / png).shape[0] > 200


def test_inspect_plot(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    q = tmp_path / "q"
    assert main(["quantize", str(src), str(q), "--quiet", "--format", "nf4", "--group-size", "32"]) == 0
    out = tmp_path / "layer.png"
    assert main(["inspect", str(q), "--plot", "model.layers.0.mlp.down_proj", "--plot-out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def err_of(capsys, *argv):
    capsys.readouterr()
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # transformers may print its own load bar before
    assert last.startswith("llmq: error:") and err.count("llmq: error:") == 1
    return last


def test_eval_bad_input(tiny_dir, tmp_path, capsys):
    src = tiny_dir("llama", tokenizer=True)
    assert "unknown dataset name" in err_of(capsys, "eval", src, "--dataset", "wikitext7")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "fewer than one window of seqlen=64" in err_of(capsys, "eval", src, "--dataset", short, "--seqlen", "64")
    assert "longer than the model's 256 positions" in err_of(capsys, "eval", src, "--dataset", short)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")  # fmt: skip
    assert "not a causal LM" in err_of(capsys, "eval", tmp_path / "bert", "--dataset", short)
    assert "not a readable eval record" in err_of(capsys, "report", tmp_path / "nope.json", "--out", tmp_path / "r")
