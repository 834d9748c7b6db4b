"""Bad input, one table: every case runs the CLI (or the Python loader) the way a user would and asserts the exit code,
the one-line message, that no traceback reached the user, and that nothing was left behind (no new file or dir
beside the inputs, for quantize and export: no OUT at all)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, incomplete, make_tiny, make_tokenizer
from safetensors.torch import load_file, save_file

import llmq
from llmq.cli import main
from llmq.errors import LlmqError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with a tokenizer, an llmq checkpoint of it (int4 g32 sym), a q4_0 checkpoint, texts, a record."""
    w = tmp_path_factory.mktemp("bad")
    src = w / "src"
    make_tiny("llama", vocab=300).save_pretrained(src)
    make_tokenizer(300).save_pretrained(src)
    (w / "calib.txt").write_text(SAMPLE_TEXT)
    (w / "empty.txt").write_text("")
    (w / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (w / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    (w / "short.txt").write_text("too short")
    assert main(["quantize", str(src), str(w / "q"), "--quiet", "--bits", "4", "--sym", "--group-size", "32"]) == 0
    assert main(["quantize", str(src), str(w / "q40"), "--quiet", "--format", "q4_0"]) == 0
    rec = {"label": "x", "perplexity": 10.0, "tokens_scored": 100, "kind": "fp", "method": "fp",
           "dataset": {"sha256": "ab", "name": "t", "split": "test", "tokens": 10},
           "protocol": {"seqlen": 8, "stride": 8}}  # fmt: skip
    (w / "good.json").write_text(json.dumps(rec))
    (w / "types.json").write_text(json.dumps(rec | {"perplexity": "10.0"}))
    (w / "nested.json").write_text(json.dumps(rec | {"protocol": {"seqlen": "8", "stride": 8}}))
    (w / "list.json").write_text("[1, 2]")
    (w / "afile").write_text("x")
    foreign = w / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return w


def damaged_copy(w: Path, name: str, edit) -> Path:
    """A copy of the int4 checkpoint with `edit(dir)` applied."""
    import shutil

    d = w / name
    if not d.exists():
        shutil.copytree(w / "q", d)
        edit(d)
    return d


def truncate(d):
    s = next(d.glob("model-*.safetensors"))
    s.write_bytes(s.read_bytes()[:200])


def flip(d):
    s = next(d.glob("model-*.safetensors"))
    b = bytearray(s.read_bytes())
    b[-50] ^= 0xFF
    s.write_bytes(bytes(b))


def bits_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["scheme"]["bits"] = 3
    (d / "config.json").write_text(json.dumps(cfg))


def drop_norm(d):
    """A checkpoint consistently written without its final norm (index and checksums updated)."""
    from llmq.checkpoint import sha256_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    s = d / index["weight_map"].pop("model.norm.weight")
    state = load_file(s)
    state.pop("model.norm.weight")
    save_file(state, s, metadata={"format": "pt", "llmq_format_version": "1"})
    index["metadata"]["llmq_sha256"][s.name] = sha256_file(s)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


Q = ["quantize", "{src}", "{out}", "--quiet"]
G = [*Q, "--method", "gptq", "--calib", "{w}/calib.txt", "--nsamples", "2", "--seqlen", "16"]
C = [*Q, "--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--calib"]  # + the calibration file
# (id, argv, exit code, message regex); {src}, {out}, {w}, {q}, {q40} are filled in
CASES = [
    ("quantize: no such model", ["quantize", "{w}/nope", "{out}"], 2, r"nope"),
    ("quantize: --bits 5", [*Q, "--bits", "5"], 2, r"bits=5 is not supported"),
    ("quantize: --group-size 7", [*Q, "--group-size", "7"], 2, r"group_size=7 is not supported"),
    ("quantize: --outliers 0.7", [*Q, "--outliers", "0.7"], 2, r"outliers=0.7 must be a fraction"),
    ("quantize: q4_k with a group size", [*Q, "--format", "q4_k", "--group-size", "64"], 2, r"groups are 32 columns"),
    ("quantize: q4_0 with double quant", [*Q, "--format", "q4_0", "--double-quant"], 2, r"double_quant does not"),
    ("quantize: recipe and format", [*Q, "--gguf-recipe", "Q4_K_M", "--format", "nf4"], 2, r"leave out --format"),
    ("quantize: recipe with mixed", [*G, "--gguf-recipe", "Q4_K_M", "--target-bpw", "4"], 2, r"cannot be combined"),
    ("quantize: --max-shard-size 0", [*Q, "--max-shard-size", "0"], 2, r"--max-shard-size 0 bytes"),
    ("quantize: --max-shard-size 2", [*Q, "--max-shard-size", "2"], 2, r"at least 1KB with its unit"),
    ("quantize: --candidates alone", [*Q, "--candidates", "int4-g128"], 2, r"only used with --target-bpw"),
    ("quantize: --target-bpw 0.5", [*G, "--target-bpw", "0.5"], 2, r"target_bpw=0.5"),
    ("quantize: bad candidate", [*G, "--target-bpw", "4", "--candidates", "int4-g1x"], 2, r"not understood"),
    ("quantize: --damp 0", [*G, "--damp", "0"], 2, r"damp=0"),
    ("quantize: --nsamples 0", [*G[:-4], "--nsamples", "0", "--seqlen", "16"], 2, r"nsamples=0"),
    ("quantize: --seqlen 1", [*G[:-2], "--seqlen", "1"], 2, r"seqlen=1"),
    ("quantize: seqlen > positions", [*G[:-2], "--seqlen", "512"], 2, r"longer than the model's 256 positions"),
    ("quantize: missing calib file", [*C, "{w}/none.txt"], 2, r"none.txt: no such file"),
    ("quantize: empty calib file", [*C, "{w}/empty.txt"], 2, r"the file is empty"),
    ("quantize: binary calib file", [*C, "{w}/binary.txt"], 2, r"a binary file"),
    ("quantize: latin-1 calib file", [*C, "{w}/latin1.txt"], 2, r"not UTF-8 text"),
    ("quantize: calib too short", [*Q, "--method", "gptq", "--calib", "{w}/short.txt", "--nsamples", "4", "--seqlen",
                                   "64"], 2, r"fewer than (the )?nsamples"),  # fmt: skip
    ("quantize: cuda without CUDA", [*Q, "--device", "cuda"], 2, r"CUDA is not available"),
    ("quantize: foreign OUT", ["quantize", "{src}", "{w}/foreign"], 2, r"not an llmq output; choose another"),
    ("quantize: OUT is a file", ["quantize", "{src}", "{w}/afile"], 2, r"not a directory"),
    ("eval: --max-windows 0", ["eval", "{q}", "--max-windows", "0"], 2, r"--max-windows 0"),
    ("eval: --stride 0", ["eval", "{q}", "--stride", "0"], 2, r"--stride 0"),
    ("eval: --seqlen 0", ["eval", "{q}", "--seqlen", "0"], 2, r"--seqlen 0"),
    ("eval: --batch-size 0", ["eval", "{q}", "--batch-size", "0"], 2, r"--batch-size 0"),
    ("eval: cuda without CUDA", ["eval", "{q}", "--device", "cuda"], 2, r"CUDA is not available"),
    ("eval: --json in a missing dir", ["eval", "{q}", "--json", "{w}/nodir/r.json"], 2, r"does not exist"),
    ("eval: --json is a dir", ["eval", "{q}", "--json", "{w}"], 2, r"is a directory"),
    ("eval: binary dataset", ["eval", "{q}", "--dataset", "{w}/binary.txt"], 2, r"a binary file"),
    ("eval: seqlen > positions", ["eval", "{q}", "--dataset", "{w}/calib.txt", "--seqlen", "512"], 2,
     r"longer than the model's 256 positions"),
    ("eval: missing dataset", ["eval", "{q}", "--dataset", "{w}/none.txt"], 2, r"no such file"),
    ("eval: truncated shard", ["eval", "{trunc}", "--dataset", "{w}/calib.txt"], 2, r"truncated or corrupted"),
    ("inspect: truncated shard", ["inspect", "{trunc}"], 2, r"truncated or corrupted"),
    ("inspect: flipped byte", ["inspect", "{flip}"], 2, r"checksum mismatch"),
    ("inspect: bits mismatch", ["inspect", "{bits}"], 2, r"qweight: shape"),
    ("inspect: not a dir", ["inspect", "{w}/afile"], 2, r"no such directory"),
    ("report: wrong field type", ["report", "{w}/types.json", "--out", "{w}/rep"], 2, r"'perplexity' is str"),
    ("report: wrong nested type", ["report", "{w}/nested.json", "--out", "{w}/rep"], 2, r"'protocol.seqlen' is str"),
    ("report: not a record", ["report", "{w}/list.json", "--out", "{w}/rep"], 2, r"no 'perplexity' field"),
    ("report: --out is a file", ["report", "{w}/good.json", "--out", "{w}/afile"], 2, r"is a file"),
    ("export: int4 sym g32 is Q4_0 (accepted)", ["export", "{q}", "{w}/x.gguf", "--to", "gguf"], 0, None),
    ("export: q4_0 to compressed-tensors", ["export", "{q40}", "{w}/ct", "--to", "compressed-tensors"], 2,
     r"llama.cpp's q4_0 blocks; export it with --to gguf"),
    ("export: gguf dest exists", ["export", "{q40}", "{w}/afile", "--to", "gguf"], 2, r"pass --overwrite"),
    ("export: flipped byte", ["export", "{flip}", "{w}/y.gguf", "--to", "gguf"], 2, r"checksum mismatch"),
    ("export: bad embedding type", ["export", "{q40}", "{w}/z.gguf", "--to", "gguf", "--gguf-embedding-type",
                                    "q9_9"], 2, r"invalid choice"),  # fmt: skip
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, case):
    _, argv, code, msg = case
    w = world
    paths = {"src": w / "src", "out": tmp_path / "out", "w": w, "q": w / "q", "q40": w / "q40",
             "trunc": damaged_copy(w, "trunc", truncate), "flip": damaged_copy(w, "flip", flip),
             "bits": damaged_copy(w, "bits", bits_mismatch)}  # fmt: skip
    argv = [a.format(**paths) for a in argv]
    before = sorted(p for p in w.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors: usage + one line, exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err[-2000:]
    assert "Traceback" not in err
    if msg is not None:
        lines = [x for x in err.splitlines() if x.startswith(("llmq: error:", "llmq ", "usage:")) or "error:" in x]
        assert lines and re.search(msg, lines[-1]), err[-2000:]
    if code != 0:
        after = sorted(p for p in w.rglob("*"))
        new = [p for p in after if p not in before and p.name not in ("trunc", "flip", "bits")]
        assert new == [] and not (tmp_path / "out").exists(), new


@pytest.mark.parametrize("loader", ["load_quantized", "from_pretrained"])
@pytest.mark.parametrize("damage, msg", [(truncate, "truncated or corrupted"), (flip, "checksum mismatch"),
                                         (bits_mismatch, "qweight: shape"), (drop_norm, "model.norm.weight")])
def test_every_loader_refuses_damage(world, loader, damage, msg):
    from transformers import AutoModelForCausalLM

    d = damaged_copy(world, f"{loader}-{damage.__name__}", damage)
    with pytest.raises(LlmqError, match=msg):
        llmq.load_quantized(d) if loader == "load_quantized" else AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("loader", ["load_quantized", "from_pretrained", "inspect", "eval", "export"])
def test_interrupted_dir_says_rerun_in_every_reader(world, tmp_path, capsys, loader):
    """A conversion killed after its first layer: every reader says it is an interrupted conversion to resume."""
    from transformers import AutoModelForCausalLM

    from conftest import quantize_killed_after

    d = tmp_path / "half"
    r = quantize_killed_after(0, world / "src", d, "--quiet", "--bits", "4")
    assert r.returncode != 0 and incomplete(d)
    want = "an interrupted conversion, not a complete llmq checkpoint: rerun the same `llmq quantize`"
    if loader in ("load_quantized", "from_pretrained"):
        with pytest.raises(LlmqError, match=want):
            llmq.load_quantized(d) if loader == "load_quantized" else AutoModelForCausalLM.from_pretrained(d)
        return
    argv = {"inspect": ["inspect", str(d)], "eval": ["eval", str(d), "--dataset", str(world / "calib.txt")],
            "export": ["export", str(d), str(tmp_path / "x.gguf"), "--to", "gguf"]}[loader]  # fmt: skip
    assert main(argv) == 2 and want in capsys.readouterr().err


def test_disk_full_is_one_line_with_the_resume_hint(world, tmp_path, capsys, monkeypatch):
    """No space left on device after the first layer: one error line saying how to resume, no traceback, the finished
    layer kept, nothing that looks complete."""
    import errno

    from llmq import checkpoint

    real, calls = checkpoint.atomic_save_tensors, []

    def full(path, tensors, metadata=checkpoint.SHARD_METADATA):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "atomic_save_tensors", full)
    out = tmp_path / "out"
    rc = main(["quantize", str(world / "src"), str(out), "--quiet", "--bits", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no space left on device" in err and "rerun the same command to resume" in err
    assert incomplete(out) and (out / "llmq_progress.json").is_file()


def test_bad_calibration_fails_before_the_model_loads(world, tmp_path, monkeypatch, capsys):
    """A bad --calib is reported before the model is loaded (on this path a .gguf source loads whole: minutes for a
    big model)."""
    from llmq import convert

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(convert, "LazyModel", never)
    for bad in ("none.txt", "empty.txt", "binary.txt"):
        rc = main(["quantize", str(world / "src"), str(tmp_path / "o"), "--method", "gptq", "--seqlen", "16",
                   "--calib", str(world / bad)])  # fmt: skip
        assert rc == 2 and "Traceback" not in capsys.readouterr().err


def test_gguf_source_bad_input_in_seconds_without_reading_the_model(world, tmp_path, monkeypatch, capsys):
    """On a .gguf source (whose config alone transformers parses in seconds, and whose model loads whole), bad
    calibration text and a window longer than the model's positions are refused before either is read."""
    import time

    from llmq import convert

    gguf_file = tmp_path / "tiny.gguf"  # a real GGUF: the tiny model on llama.cpp's Q8_0 grid, exported
    assert main(["quantize", str(world / "src"), str(tmp_path / "q8"), "--quiet", "--format", "q8_0"]) == 0
    assert main(["export", str(tmp_path / "q8"), str(gguf_file), "--to", "gguf", "--quiet"]) == 0

    def never(*a, **k):
        raise AssertionError("the model's config or weights were read")

    monkeypatch.setattr(convert.sources, "load_config", never)
    monkeypatch.setattr(convert, "LazyModel", never)
    w = ["--seqlen", "64", "--nsamples", "2", "--calib"]
    cases = [([*w, str(world / "none.txt")], "no such file"), ([*w, str(world / "empty.txt")], "empty"),
             ([*w, str(world / "binary.txt")], "binary"), ([*w, str(world / "short.txt")], "fewer than"),
             (["--calib", str(world / "calib.txt"), "--seqlen", "4096"], "longer than the model's 256 positions")]
    for extra, msg in cases:
        t0 = time.perf_counter()
        rc = main(["quantize", str(gguf_file), str(tmp_path / "o"), "--method", "gptq", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err
        assert time.perf_counter() - t0 < 5 and not (tmp_path / "o").exists()


def test_quiet_gguf_source_and_architectures_filled_in(world, tmp_path, capsys):
    """--quiet silences transformers' GGUF de-quantizing bar too; a source whose config has no `architectures`
    (as transformers' GGUF loader leaves it) gets its causal-LM class in the written config.json."""
    gguf_file = tmp_path / "tiny.gguf"
    assert main(["quantize", str(world / "src"), str(tmp_path / "q8"), "--quiet", "--format", "q8_0"]) == 0
    assert main(["export", str(tmp_path / "q8"), str(gguf_file), "--to", "gguf", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "from-gguf"
    assert main(["quantize", str(gguf_file), str(out), "--quiet", "--bits", "4", "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "de-quantizing" not in err and "it/s" not in err, err[-500:]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ---- values no checksum can judge (llmq/verify.py) -------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
L0 = "model.layers.0."


def rewrite(d: Path, tensor: str, edit) -> None:
    """Replace one tensor of checkpoint `d` with edit(its copy), keeping dtype and shape, and recompute the shard's
    sha256 in the index: the damage a byte check cannot see."""
    from safetensors import safe_open

    from llmq.checkpoint import sha256_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][tensor]
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    state = load_file(shard)
    t = edit(state[tensor].clone())
    assert t.dtype == state[tensor].dtype and t.shape == state[tensor].shape
    state[tensor] = t
    save_file(state, shard, metadata=meta)
    index["metadata"]["llmq_sha256"][shard.name] = sha256_file(shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def at(pos, value):
    def edit(t):
        t[pos] = value
        return t

    return edit


def f16_at(block: int, offset: int, value: float):
    """Write an fp16 `value` into row 0's block `block` at byte `offset` of a q4_0 qweight (uint8 [R, bytes])."""

    def edit(t):
        raw = torch.tensor([value], dtype=torch.float16).view(torch.uint8)
        t[0, block * 18 + offset : block * 18 + offset + 2] = raw  # q4_0: 18 bytes a block
        return t

    return edit


def dup_perm(t):
    t[1] = t[0]
    return t


def move_row(t):
    t[0] = 3  # a piece that does not exist
    return t


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases) quantized with GPTQ, act-order without static groups (a stored perm), asymmetric
    int4 g32 with double-quantized scales and 1% outliers; and a per-row mixed-precision checkpoint (row_part)."""
    w = tmp_path_factory.mktemp("values")
    make_tiny("qwen2", vocab=300).save_pretrained(w / "src")
    make_tokenizer(300).save_pretrained(w / "src")
    (w / "calib.txt").write_text(SAMPLE_TEXT)
    common = ["--quiet", "--method", "gptq", "--calib", str(w / "calib.txt"), "--nsamples", "4", "--seqlen", "32"]
    assert main(["quantize", str(w / "src"), str(w / "rich"), *common, "--bits", "4", "--group-size", "32",
                 "--double-quant", "--outliers", "0.01", "--no-static-groups"]) == 0  # fmt: skip
    assert main(["quantize", str(w / "src"), str(w / "rows"), *common, "--target-bpw", "3.5", "--granularity",
                 "row"]) == 0  # fmt: skip
    return w


def rows_module(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return next(k for k in index["weight_map"] if k.endswith(".row_part")).removesuffix(".row_part")


# (id, which checkpoint, tensor, edit, the found value / position in the message)
VALUE_CASES = [
    ("scale NaN", "q", L0 + "self_attn.q_proj.scales", at((3, 1), NAN), r"nan at position \[3, 1\]"),
    ("scale Inf", "q", L0 + "mlp.down_proj.scales", at((0, 2), INF), r"inf at position \[0, 2\]"),
    ("scale zero", "q", L0 + "self_attn.v_proj.scales", at((5, 0), 0.0), r"0.0 at position \[5, 0\]"),
    ("scale negative", "q", L0 + "mlp.up_proj.scales", at((2, 1), -0.5), r"-0.5 at position \[2, 1\]"),
    ("dq offset NaN", "rich", L0 + "mlp.gate_proj.scales_off", at((1, 0), NAN), r"nan at position \[1, 0\]"),
    ("dq offset zero", "rich", L0 + "mlp.gate_proj.scales_off", at((0, 0), 0.0), r"0.0 at position \[0, 0\]"),
    ("dq step negative", "rich", L0 + "self_attn.o_proj.scales_step", at((1, 0), -1.0), r"-1.0 at position \[1, 0\]"),
    ("outlier Inf", "rich", L0 + "mlp.down_proj.outlier_val", at(2, -INF), r"-inf at position \[2\]"),
    ("perm duplicate", "rich", L0 + "self_attn.k_proj.perm", dup_perm, r"at position \[0\], 2 times"),
    ("q4_0 d NaN", "q40", L0 + "self_attn.q_proj.qweight", f16_at(1, 0, NAN), r"field d = nan at position \[0, 1\]"),
    ("norm NaN", "q", "model.norm.weight", at(7, NAN), r"nan at position \[7\]"),
    ("embedding Inf", "q", "model.embed_tokens.weight", at((9, 4), INF), r"inf at position \[9, 4\]"),
    ("bias NaN", "rich", L0 + "self_attn.q_proj.bias", at(5, NAN), r"nan at position \[5\]"),
    ("row_part piece", "rows", "{rows}.row_part", move_row, r"piece 3 at position \[0\]"),
]


def value_damaged(world, rich, case) -> tuple[Path, str]:
    name, which, tensor, edit, _ = case
    base = {"q": world / "q", "q40": world / "q40", "rich": rich / "rich", "rows": rich / "rows"}[which]
    tensor = tensor.format(rows=rows_module(base) if which == "rows" else "")
    d = rich / ("v-" + name.replace(" ", "-"))
    if not d.exists():
        shutil.copytree(base, d)
        rewrite(d, tensor, edit)
    return d, tensor


@pytest.mark.parametrize("reader", ["load_quantized", "from_pretrained", "inspect"])
@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_damaged_values_are_refused_with_file_tensor_and_position(world, rich, capsys, reader, case):
    """Checksums that match broken contents: every reader names the shard file, the tensor, the first bad position
    and says the checkpoint is damaged."""
    from transformers import AutoModelForCausalLM

    d, tensor = value_damaged(world, rich, case)
    if reader == "inspect":
        assert main(["inspect", str(d)]) == 2
        msg = capsys.readouterr().err
    else:
        with pytest.raises(LlmqError) as e:
            llmq.load_quantized(d) if reader == "load_quantized" else AutoModelForCausalLM.from_pretrained(d)
        msg = str(e.value)
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    assert f"{d / shard}: tensor {tensor}:" in msg, msg
    assert re.search(case[4], msg) and "the checkpoint is damaged" in msg, msg


@pytest.mark.parametrize("case", [VALUE_CASES[0], VALUE_CASES[10]], ids=["scale", "norm"])
def test_damaged_values_are_refused_by_eval_and_export(world, rich, tmp_path, capsys, case):
    d, tensor = value_damaged(world, rich, case)
    assert main(["eval", str(d), "--dataset", str(world / "calib.txt")]) == 2
    assert f"tensor {tensor}:" in capsys.readouterr().err
    for to, dest in (("compressed-tensors", tmp_path / "ct"), ("gguf", tmp_path / "x.gguf")):
        assert main(["export", str(d), str(dest), "--to", to, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"tensor {tensor}:" in err and "Traceback" not in err, err
        assert not dest.exists()


def test_llmq_verify_0_skips_the_value_checks_with_the_hashing(world, rich, monkeypatch):
    """LLMQ_VERIFY=0 loads a NaN scale and a NaN norm (that is what it is for: no check beyond the headers and
    indices); the index checks that keep reads in bounds still run."""
    monkeypatch.setenv("LLMQ_VERIFY", "0")
    model = llmq.load_quantized(value_damaged(world, rich, VALUE_CASES[0])[0])
    assert not torch.isfinite(model.model.layers[0].self_attn.q_proj(torch.randn(2, 64))).all()
    model = llmq.load_quantized(value_damaged(world, rich, VALUE_CASES[10])[0])
    assert not torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    d, _ = value_damaged(world, rich, VALUE_CASES[8])  # a duplicated perm entry: refused all the same
    with pytest.raises(LlmqError, match="perm"):
        llmq.load_quantized(d)


def test_llmq_never_writes_a_nan(world, tmp_path, monkeypatch):
    """A NaN that reaches the writer (a damaged source's norm, or a bug that makes a NaN scale) is refused before a
    shard holding it is renamed into place: the conversion stops with the tensor named and no complete checkpoint."""
    from llmq import codec
    from llmq.algorithms.rtn import rtn
    from llmq.qtensor import QuantizedWeight

    src = tmp_path / "src"
    shutil.copytree(world / "src", src)
    state = load_file(src / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["quantize", str(src), str(tmp_path / "a"), "--quiet", "--bits", "4"]) == 2
    assert incomplete(tmp_path / "a")
    real = codec.encode

    def nan_scale(name, qw):
        if isinstance(qw, QuantizedWeight) and "scales" in qw.parts:
            qw.parts["scales"][0, 0] = float("nan")
        return real(name, qw)

    monkeypatch.setattr(codec, "encode", nan_scale)
    with pytest.raises(LlmqError, match=r"refusing to write model.layers.0.self_attn.q_proj.scales: nan at position"):
        scheme = llmq.QuantScheme(bits=4)
        qw = {"model.layers.0.self_attn.q_proj": rtn(torch.randn(64, 64), scheme)}
        llmq.save_quantized(make_tiny("llama", vocab=300), qw, tmp_path / "b", llmq.QuantPlan(scheme), {"name": "rtn"})


def test_codes_and_zero_points_cannot_leave_their_grid():
    """Why no check looks at codes or zero points: they are stored `bits` wide and every codebook has 2^bits entries,
    so every stored bit pattern decodes to a point of the grid. A format that breaks this needs a value check."""
    from llmq import formats
    from llmq.formats import packing

    for name, fmt in formats.FORMATS.items():
        if fmt.codebook is not None:
            assert len(fmt.codebook) == 2 ** fmt.bits[0], name
    for bits in (2, 3, 4, 8):
        every = torch.randint(0, 256, (4, packing.packed_row_bytes(64, bits)), dtype=torch.uint8)
        assert int(packing.unpack(every, bits, 64).max()) <= 2**bits - 1
