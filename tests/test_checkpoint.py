import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmq
from llmq.checkpoint import tensor_bytes
from llmq.cli import main
from llmq.errors import LlmqError
from llmq.inspect import inspect_dir

from conftest import incomplete

SCHEMES = {
    "int4-g128": ["--bits", "4", "--group-size", "128"],
    "nf4-g64-dq": ["--format", "nf4", "--group-size", "64", "--double-quant"],
    "nf3-g32-dq": ["--format", "nf3", "--group-size", "32", "--double-quant"],  # --bits implied by the format
    "nf2-g64-dq": ["--format", "nf2", "--group-size", "64", "--double-quant"],
    "fp4-g32": ["--format", "fp4", "--group-size", "32"],
    "int8-pc": ["--bits", "8", "--group-size", "-1"],
    "int3-sym-out": ["--bits", "3", "--sym", "--group-size", "32", "--outliers", "0.01"],
    "int2-g32-clip": ["--bits", "2", "--group-size", "32", "--clip-search"],
    "int4-pt": ["--bits", "4", "--group-size", "0"],
}


def quantize_cli(src, out, *extra):
    assert main(["quantize", str(src), str(out), "--quiet", *extra]) == 0


def scheme_of(args):
    from llmq.cli import build_parser, scheme_from_args

    return scheme_from_args(build_parser().parse_args(["quantize", "m", "o", *args]))


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_roundtrip_logits_match_fake_quant(tiny_dir, tmp_path, name, arch):
    from transformers import AutoModelForCausalLM

    src = tiny_dir(arch, tie_word_embeddings=(arch == "gpt2"))
    out = tmp_path / "q"
    quantize_cli(src, out, *SCHEMES[name])
    q = llmq.load_quantized(out, backend="reference")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qw = llmq.quantize(ref, scheme_of(SCHEMES[name]))
    llmq.fake_quantize(ref, qw)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (q(x).logits - ref(x).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert q.generate(x[:1], max_new_tokens=4, do_sample=False).shape == (1, 28)


def test_bits_per_weight_counts_every_written_byte(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "q"
    quantize_cli(src, out, "--bits", "3", "--group-size", "48", "--double-quant", "--outliers", "0.005")
    written = tensor_bytes(out)
    info = inspect_dir(out)
    q = llmq.load_quantized(out)
    for m in info["modules"]:
        mod = q.get_submodule(m["name"])
        qw = mod.quantized_weight()
        on_disk = sum(v for k, v in written.items() if k.startswith(m["name"] + ".") and not k.endswith(".bias"))
        assert qw.bits_per_weight() == pytest.approx(8 * on_disk / (qw.shape[0] * qw.shape[1]), rel=0, abs=1e-12)
        assert m["bits_per_weight"] == pytest.approx(qw.bits_per_weight(), abs=1e-4)


def test_sharded_write_and_index(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "q"
    quantize_cli(src, out, "--max-shard-size", "40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not list(out.glob("llmq-part-*")) and not list(out.glob(".*tmp"))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmq" and cfg["format_version"] == 1
    assert cfg["modules_not_converted"] == ["lm_head"]
    for s in shards:
        from safetensors import safe_open

        with safe_open(s, "pt") as f:
            assert f.metadata() == {"format": "pt", "llmq_format_version": "1"}
    llmq.load_quantized(out)


# ---- bad input ----------------------------------------------------------------------------------
def run_err(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("llmq: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_path(capsys, tmp_path):
    err = run_err(capsys, "quantize", tmp_path / "nope", tmp_path / "out")
    assert "nope" in err and "no such file" in err
    assert not (tmp_path / "out").exists()


def test_not_a_causal_lm(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")  # fmt: skip
    err = run_err(capsys, "quantize", tmp_path / "bert", tmp_path / "out")
    assert "not a causal LM" in err and "bert" in err
    assert not (tmp_path / "out").exists()


def test_dir_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in run_err(capsys, "quantize", tmp_path / "empty", tmp_path / "out")


@pytest.mark.parametrize("args, match", [(["--bits", "5"], "bits=5"), (["--group-size", "7"], "group_size=7"),
                                         (["--format", "nf4", "--bits", "3"], "nf4"),
                                         (["--format", "nf3", "--bits", "4"], "3-bit codebook"),
                                         (["--format", "nf2", "--bits", "3"], "2-bit codebook")])  # fmt: skip
def test_unsupported_scheme(capsys, tiny_dir, tmp_path, args, match):
    err = run_err(capsys, "quantize", tiny_dir("llama"), tmp_path / "out", *args)
    assert match in err
    assert not (tmp_path / "out").exists()


def test_output_dir_not_empty(capsys, tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = run_err(capsys, "quantize", src, out)
    assert "not an llmq output; choose another" in err and "--overwrite" not in err  # it would not help
    err = run_err(capsys, "quantize", src, out, "--overwrite")  # not an llmq dir: never deleted
    assert "not an llmq output" in err and (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    quantize_cli(src, out)
    assert "pass --overwrite" in run_err(capsys, "quantize", src, out)  # an earlier llmq output: --overwrite helps
    quantize_cli(src, out, "--overwrite")


def test_disk_full_keeps_progress_and_nothing_looks_complete(tiny_dir, tmp_path, monkeypatch, capsys):
    import llmq.checkpoint as ck

    src = tiny_dir("llama")
    real = ck.CheckpointWriter.finish

    def boom(self, config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.CheckpointWriter, "finish", boom)
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", str(src), str(out), "--quiet"]) == 2
    assert "no space left on device; free space, then rerun the same command to resume" in capsys.readouterr().err
    assert out.is_dir() and incomplete(out)
    with pytest.raises(LlmqError, match="interrupted conversion"):
        llmq.load_quantized(out)
    monkeypatch.setattr(ck.CheckpointWriter, "finish", real)  # space freed
    assert main(["quantize", str(src), str(out), "--quiet"]) == 0  # resumes, no --overwrite needed
    assert not (out / "llmq_progress.json").exists()
    llmq.load_quantized(out)


def test_unwritable_output_dir(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = run_err(capsys, "quantize", tiny_dir("llama"), blocker / "q")
    assert "cannot write to the output directory" in err and "a-file" in err


def test_incomplete_dir_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "q"
    quantize_cli(tiny_dir("llama"), out)
    (out / "config.json").unlink()
    with pytest.raises(LlmqError, match="no config.json; not a complete llmq checkpoint"):
        llmq.load_quantized(out)
    # what a killed conversion leaves: parts written, no index, no config
    (out / "model.safetensors.index.json").unlink()
    shard_of(out).rename(out / "llmq-part-00001.safetensors")
    with pytest.raises(LlmqError, match="no config.json.*interrupted conversion"):
        llmq.load_quantized(out)


@pytest.fixture
def qdir(tiny_dir, tmp_path):
    out = tmp_path / "q"
    quantize_cli(tiny_dir("llama"), out)
    return out


def shard_of(d: Path) -> Path:
    return next(d.glob("model-*.safetensors"))


def load_with(loader: str, d, verify=True, monkeypatch=None):
    """Both loading paths: llmq.load_quantized, and transformers' from_pretrained after `import llmq`."""
    if loader == "load_quantized":
        return llmq.load_quantized(d, verify=verify)
    from transformers import AutoModelForCausalLM

    if not verify:
        monkeypatch.setenv("LLMQ_VERIFY", "0")
    return AutoModelForCausalLM.from_pretrained(d)


LOADERS = ["load_quantized", "from_pretrained"]


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_shard(qdir, loader):
    s = shard_of(qdir)
    data = s.read_bytes()
    s.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmqError, match=f"{s.name}.*truncated or corrupted"):
        load_with(loader, qdir)


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupted_shard_bytes(qdir, loader):
    """One flipped byte in tensor data: the shard's checksum, on every loading path."""
    s = shard_of(qdir)
    data = bytearray(s.read_bytes())
    data[-100] ^= 0xFF
    s.write_bytes(bytes(data))
    with pytest.raises(LlmqError, match=f"{s.name}: checksum mismatch"):
        load_with(loader, qdir)


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupted_shard_header(qdir, loader, monkeypatch):
    s = shard_of(qdir)
    data = bytearray(s.read_bytes())
    data[10:20] = b"!!!!!!!!!!"
    s.write_bytes(bytes(data))
    with pytest.raises(LlmqError, match=f"{s.name}.*truncated or corrupted"):
        load_with(loader, qdir, verify=False, monkeypatch=monkeypatch)


def test_wrong_format_version(qdir):
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmqError, match="format_version 2.*upgrade llmq"):
        llmq.load_quantized(qdir)


def rewrite_shard(qdir, edit, key):
    """Apply `edit` to the tensors of the shard holding `key`, and keep the index consistent."""
    index = json.loads((qdir / "model.safetensors.index.json").read_text())
    shard = qdir / index["weight_map"][key]
    t = load_file(shard)
    edit(t)
    save_file(t, shard, metadata={"format": "pt", "llmq_format_version": "1"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in t}
    (qdir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(qdir):
    rewrite_shard(qdir, lambda t: t.pop("model.layers.1.mlp.up_proj.scales"), "model.layers.1.mlp.up_proj.scales")
    with pytest.raises(LlmqError, match="model.layers.1.mlp.up_proj.*missing tensor.*up_proj.scales"):
        llmq.load_quantized(qdir, verify=False)


def test_missing_full_precision_tensor(qdir):
    rewrite_shard(qdir, lambda t: t.pop("model.norm.weight"), "model.norm.weight")
    with pytest.raises(LlmqError, match="missing.*model.norm.weight"):
        llmq.load_quantized(qdir, verify=False)


def test_shape_mismatch(qdir):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.scales"] = t["model.layers.0.self_attn.q_proj.scales"][:-1].clone()

    rewrite_shard(qdir, edit, "model.layers.0.self_attn.q_proj.scales")
    with pytest.raises(LlmqError, match=r"q_proj.scales: shape \(63, 1\), expected \(64, 1\)"):
        llmq.load_quantized(qdir, verify=False)


def test_dtype_mismatch(qdir):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.scales"] = t["model.layers.0.self_attn.q_proj.scales"].float()

    rewrite_shard(qdir, edit, "model.layers.0.self_attn.q_proj.scales")
    with pytest.raises(LlmqError, match=r"q_proj.scales: dtype torch.float32, expected torch.float16"):
        llmq.load_quantized(qdir, verify=False)


def test_missing_shard(qdir):
    shard_of(qdir).unlink()
    with pytest.raises(LlmqError, match="shard listed in the index is missing"):
        llmq.load_quantized(qdir)
