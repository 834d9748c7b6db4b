"""`llmq quantize` as a conversion tool: killed and resumed, refused, bad sources, its summary and outputs."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import incomplete, make_tiny, make_tokenizer, quantize_killed_after
from safetensors.torch import load_file, save_file

import llmq
from llmq.cli import main
from llmq.errors import LlmqError


@pytest.fixture
def src4(tmp_path):
    """A 4-layer tiny Llama with a tokenizer, saved as safetensors shards (several, with an index)."""
    d = tmp_path / "src"
    make_tiny("llama", vocab=300, num_hidden_layers=4).save_pretrained(d, max_shard_size="60KB")
    make_tokenizer(300).save_pretrained(d)
    assert len(list(d.glob("model-*.safetensors"))) > 1
    return d


def cli(src, out, *extra, env=None):
    cmd = [sys.executable, "-m", "llmq", "quantize", str(src), str(out), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def all_tensors(d):
    out = {}
    for f in sorted(d.glob("model-*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-fp-inputs"])
def test_kill9_then_resume_is_bit_identical(src4, sample_text, tmp_path, method):
    args = ["--method", method.removesuffix("-fp-inputs"), "--bits", "3", "--group-size", "32"]
    if method != "rtn":
        args += ["--calib", str(sample_text), "--nsamples", "4", "--seqlen", "32", "--outliers", "0.01"]
    if method == "gptq-fp-inputs":  # resuming advances the fp activations through the fp layer, not the quantized
        args += ["--gptq-inputs", "fp"]
    a, b = tmp_path / "interrupted", tmp_path / "straight"
    r = quantize_killed_after(1, src4, a, "--quiet", *args)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert incomplete(a)  # never looks complete
    progress = json.loads((a / "llmq_progress.json").read_text())
    assert sorted(progress["layers"]) == ["0", "1"]
    with pytest.raises(LlmqError, match="interrupted conversion"):
        llmq.load_quantized(a)
    r = cli(src4, a, *args)  # the same command again: resumes from layer 2
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli(src4, b, *args).returncode == 0
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert not (a / "llmq_progress.json").exists()
    # the files too: shards byte for byte (safetensors' __metadata__ order is fixed), so the index's sha256 agree
    shards = sorted(p.name for p in b.glob("model*.safetensors"))
    assert shards == sorted(p.name for p in a.glob("model*.safetensors"))
    for s in shards:
        assert (a / s).read_bytes() == (b / s).read_bytes(), s
    assert (a / "model.safetensors.index.json").read_bytes() == (b / "model.safetensors.index.json").read_bytes()


def test_resume_with_other_arguments_is_refused(src4, tmp_path):
    out = tmp_path / "q"
    assert quantize_killed_after(0, src4, out, "--quiet", "--bits", "4").returncode == -signal.SIGKILL
    r = cli(src4, out, "--bits", "3")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "interrupted conversion made with different arguments (scheme)" in err and "--overwrite" in err
    assert cli(src4, out, "--bits", "3", "--overwrite").returncode == 0


def test_nan_weights_name_the_tensor(src4, tmp_path, capsys):
    shard = next(f for f in src4.glob("model-*.safetensors") if "model.layers.2.mlp.down_proj.weight" in load_file(f))
    t = load_file(shard)
    t["model.layers.2.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", str(src4), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.2.mlp.down_proj.weight has 1 NaN/Inf value(s)" in err
    assert incomplete(out)


def test_shard_missing_from_source(src4, tmp_path, capsys):
    next(src4.glob("model-*.safetensors")).unlink()
    capsys.readouterr()
    assert main(["quantize", str(src4), str(tmp_path / "q"), "--quiet"]) == 2
    assert "shard listed in the index is missing" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_summary_model_card_and_tokenizer(src4, sample_text, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "q"
    r = cli(src4, out, "--method", "gptq", "--calib", str(sample_text), "--nsamples", "4", "--seqlen", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("llmq_version", "model", "method", "scheme", "arguments", "versions", "load_time_s", "quantize_time_s",
                "total_time_s", "peak_rss_mb", "bits_per_weight", "file_bytes", "layers", "streamed"):  # fmt: skip
        assert key in s, key
    assert s["streamed"] is True and len(s["layers"]) == 4
    assert all(0 < layer["rel_error"] < 1 and layer["seconds"] > 0 for layer in s["layers"])
    assert 3 < s["bits_per_weight"] < 5 and s["peak_rss_mb"] > 0
    card = (out / "README.md").read_text()
    assert "gptq" in card and f"{s['bits_per_weight']:.3f}" in card and "import llmq" in card
    tok = AutoTokenizer.from_pretrained(out)
    text = "The castle of the valley was found in 1801"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (out / "generation_config.json").is_file()
    llmq.load_quantized(out)


def test_peak_rss_is_the_conversions_own_not_its_parents():
    """summary.json's peak_rss_mb must not inherit the launching process's size (Linux keeps ru_maxrss across
    fork + exec): a child of a parent holding 1.5 GB reports only what it used itself."""
    big = b"\x01" * (1536 << 20)  # written, so resident
    code = "from llmq.summary import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])
    del big
    assert 20 < child < 1000, child


def test_progress_bar_and_per_layer_lines(src4, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmq", "quantize", str(src4), str(tmp_path / "q")], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0
    assert "quantize (rtn)" in r.stderr and ("layer/s" in r.stderr or "s/layer" in r.stderr)
    assert "layer 3:" in r.stderr + r.stdout
