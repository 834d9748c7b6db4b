"""`llmq export SRC DEST.gguf --to gguf`: an llmq checkpoint of llama.cpp block formats as one GGUF file that
llama.cpp runs as it is.

The quantized linears are llama.cpp's blocks already (formats/ggml.py: RTN or GPTQ chose the codes on that grid); they
are copied byte for byte, only renamed (gguf-py's tensor map) and, for the families llama.cpp stores that way
(gguf_names.FAMILIES: Llama, Mistral, Granite, SmolLM3), their q/k rows permuted as convert_hf_to_gguf.py permutes them;
Gemma's norms are written as 1 + w, as the converter writes them. Nothing is dequantized and re-rounded. int4 / int8
symmetric g32 schemes with fp16 scales are Q4_0 / Q8_0 exactly and are re-laid into those blocks. The tensors llmq keeps
in full precision: norms and biases in F32; the token embeddings and output head in the type llama-quantize gives them
for the checkpoint's mix (recipes.output_type: Q6_K, or Q8_0 where the rows are no multiple of 256), by round-to-nearest
as llama-quantize does, or in `embedding_type` (f16, f32, or a block type).

Metadata: taken from a GGUF of the same model when there is one (`metadata=`, or the .gguf the checkpoint was
converted from, when it is still there): architecture, tokenizer and chat template as they were. Otherwise written
from config.json and the tokenizer files as convert_hf_to_gguf.py would for a byte-level BPE tokenizer
(tokenizer.json); other tokenizers need `metadata=`.

Every quantized tensor's blocks are dequantized by gguf-py and compared with llmq's own dequantization (the summary
reports the largest difference: 0, bit for bit). The file is written beside DEST under a temporary name, read back
(each quantized tensor's bytes against the sha256 of the blocks compared) and then renamed to DEST: nothing is at
DEST unless the whole export succeeded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import codec, gguf_names, recipes, record, verify
from ..algorithms.rtn import rtn
from ..checkpoint import CheckpointReader
from ..config import QuantScheme
from ..errors import LlmqError
from ..formats import ggml
from ..gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS
from ..qtensor import QuantizedWeight
from ..summary import versions

log = logging.getLogger("llmq")
NAME = "gguf"
EMBEDDING_TYPES = ("auto", "f16", "f32", *ggml.TYPES)
FOR_HINT = ("`llmq quantize MODEL OUT --for llama.cpp:Q4_K_M` (or another mix) quantizes to llama.cpp's types and "
            "writes the GGUF in the same run")  # fmt: skip
SKIPPED_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")
# ftype recorded in general.file_type, by mix or by the dominant block type
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}  # fmt: skip
TYPE_FTYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
              "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K"}  # fmt: skip


def block_type_of(m: record.ModuleRecord) -> tuple[str | None, str | None]:
    """(the GGUF block type module `m` is stored as, None) or (None, why it cannot be, with the flags that avoid it)."""
    if m.split:
        return None, "is split by output row (several schemes); a GGUF tensor has one type: quantize without " \
                     "--granularity row"
    w = m.pieces[0]
    s = w.scheme
    if s.block is not None:
        return s.format, None
    exact = (s.format == "int" and s.sym and s.bits in (4, 8) and s.group_size == 32 and not s.double_quant
             and s.scale_dtype == "float16" and not s.outliers and not w.permuted and w.shape[1] % 32 == 0)  # fmt: skip
    if exact:
        return {4: "q4_0", 8: "q8_0"}[s.bits], None
    return None, (f"is {s.describe()}, which no llama.cpp block holds exactly; quantize with --gguf-recipe "
                  "(e.g. Q4_K_M) or --format q4_0 / q4_k / q6_k ...")  # fmt: skip


def blocks_of(qw: QuantizedWeight, btype: str) -> torch.Tensor:
    """The weight's llama.cpp blocks, uint8 [R, row bytes]."""
    if qw.scheme.block is not None:
        return qw.parts["qweight"]
    return ggml.TYPES[btype].pack(qw.codes(), {"d": qw.parts["scales"]})  # int sym g32 fp16: Q4_0 / Q8_0 exactly


def export(src, dest, embedding_type: str = "auto", metadata=None, overwrite: bool = False,
           quiet: bool = True) -> dict:  # fmt: skip
    """Write the llmq checkpoint `src` as the GGUF file `dest`; returns the export summary."""
    t0 = time.perf_counter()
    src, dest = Path(src), Path(dest)
    if embedding_type not in EMBEDDING_TYPES:
        raise LlmqError(f"--gguf-embedding-type {embedding_type!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    config, rec = record.read(src)
    fam = gguf_names.family_of(config.get("model_type"))
    try:
        own = fam.metadata(config)  # the family's keys; raises where llama.cpp would compute another model
    except LlmqError as e:
        raise LlmqError(f"{src} cannot be exported --to gguf: {e}; nothing was written") from None
    reader = CheckpointReader(src, verify=True)
    if verify.enabled():  # llama.cpp is never handed a NaN (llmq/verify.py)
        codec.verify_values(reader, rec)
    types = _check_modules(rec, src)
    _check_dest(dest, overwrite)
    meta_src = _metadata_source(src, metadata)
    n_layers = int(config.get("num_hidden_layers", 0))
    names = gguf_names.name_map(config.get("model_type"), n_layers)
    mix = rec.method.get("gguf_recipe") or TYPE_FTYPE[Counter(types.values()).most_common(1)[0][0]]

    tmp = dest.parent / f".{dest.name}.llmq-export-tmp"
    tmp.unlink(missing_ok=True)
    try:
        w = gguf.GGUFWriter(tmp, fam.arch)
        if meta_src is not None:
            _copy_metadata(w, meta_src, fam.arch)
        else:
            _hf_metadata(w, config, src, own)
        w.add_file_type(FTYPES[mix])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        table, diffs, digests = _add_tensors(w, rec, reader, config, names, types, fam, mix, embedding_type, quiet)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=not quiet)
        w.close()
        _verify(tmp, digests)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _summary(src, dest, mix, table, diffs, meta_src, time.perf_counter() - t0)


def why_not_config(config: dict, metadata_from_config: bool = True) -> str | None:
    """Why llama.cpp cannot run this model as the exporter writes it (the family, its own keys, the rotary
    parameters when the metadata is written from config.json), or None: from config.json alone."""
    try:
        fam = gguf_names.family_of(config.get("model_type"))
        fam.metadata(config)
        if metadata_from_config:
            gguf_names.rope_metadata(config)
    except LlmqError as e:
        return str(e)
    return None


def _check_modules(rec: record.CheckpointRecord, src: Path) -> dict[str, str]:
    types, problems = {}, []
    for n, m in rec.modules.items():
        t, why = block_type_of(m)
        if why:
            problems.append(f"{n} {why}")
        types[n] = t
    stacks: dict[str, set] = {}  # a layer's experts share one GGUF tensor per projection: one type for all of them
    for n, t in types.items():
        if gguf_names.expert_index(n) is not None and t is not None:
            stacks.setdefault(gguf_names.stacked(n), set()).add(t)
    problems += [f"{n}: its experts are stored as {', '.join(sorted(ts))}; llama.cpp stacks a layer's experts into one "
                 "tensor of one type: quantize every expert with one scheme (no mixed precision across experts)"
                 for n, ts in stacks.items() if len(ts) > 1]  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LlmqError(f"{src} cannot be exported --to gguf: {problems[0]}{more}; nothing was written. {FOR_HINT}")
    return types


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.is_dir():
        raise LlmqError(f"{dest}: is a directory; --to gguf writes one file, e.g. {dest / 'model.gguf'}")
    if dest.exists() and not overwrite:
        raise LlmqError(f"{dest}: exists; pass --overwrite to replace it")
    if not dest.parent.is_dir():
        raise LlmqError(f"{dest.parent}: no such directory")


def _metadata_source(src: Path, metadata) -> Path | None:
    """The GGUF file whose metadata (architecture, tokenizer) the export copies, or None to write it from config.json
    and the tokenizer files (metadata="config", or no GGUF source)."""
    if metadata == "config":
        return None
    if metadata is not None:
        p = Path(metadata)
        if not p.is_file():
            raise LlmqError(f"--gguf-metadata {p}: no such file")
        return p
    try:
        model = json.loads((src / "summary.json").read_text())["model"]
    except (OSError, ValueError, KeyError):
        return None
    return Path(model) if model.endswith(".gguf") and Path(model).is_file() else None


def _copy_metadata(w: gguf.GGUFWriter, path: Path, arch: str) -> None:
    r = gguf.GGUFReader(path)
    src_arch = r.fields.get("general.architecture")
    if src_arch is not None and src_arch.contents() != arch:
        raise LlmqError(f"{path}: a GGUF of architecture {src_arch.contents()!r}, this model is {arch!r}")
    for key, f in r.fields.items():
        if key.startswith(SKIPPED_KEYS) or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)


def _hf_metadata(w: gguf.GGUFWriter, c: dict, src: Path, own: dict) -> None:
    """What convert_hf_to_gguf.py writes for the model's family (gguf_names.FAMILIES: the common keys, then the
    family's own, `own`) with a byte-level BPE tokenizer."""
    heads, head_dim = c["num_attention_heads"], gguf_names.head_dim(c)
    try:
        rope = gguf_names.rope_metadata(c)
    except LlmqError as e:
        raise LlmqError(f"{src}: {e}") from None
    w.add_name(Path(src).name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(c["vocab_size"])
    for method, value in (rope | own).items():
        getattr(w, method)(value)
    _bpe_tokenizer(w, src, c["vocab_size"])


def _bpe_tokenizer(w: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    path = src / "tokenizer.json"
    if not path.is_file():
        raise LlmqError(f"{src}: no tokenizer.json; pass --gguf-metadata with a GGUF of the same model to take its "
                        "tokenizer from")  # fmt: skip
    tj = json.loads(path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LlmqError(f"{path}: a {model.get('type')} tokenizer; the exporter writes byte-level BPE tokenizers "
                        "itself, for others pass --gguf-metadata with a GGUF of the same model")  # fmt: skip
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    tokens, ttypes = [], []
    for i in range(vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            ttypes.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(s)
            special = s in added and added[s].get("special")
            ttypes.append(gguf.TokenType.CONTROL if special else
                          gguf.TokenType.USER_DEFINED if s in added else gguf.TokenType.NORMAL)  # fmt: skip
    pre, bos, eos = pre_tokenizer(src)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_add_bos_token(bos)
    w.add_add_eos_token(eos)
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = {}  # written above, from what the tokenizer does
    special.add_to_gguf(w, quiet=True)


def pre_tokenizer(src: Path) -> tuple[str, bool, bool]:
    """(llama.cpp's name for this tokenizer's pre-tokenizer, whether it adds BOS, whether it adds EOS). The name is
    found as convert_hf_to_gguf.py finds it (the hash of the ids it gives a fixed text); "default" (logged) for one
    llama.cpp does not know. BOS / EOS: what the tokenizer itself does to a text (llama.cpp's own default differs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    h = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    if h not in PRE_TOKENIZERS:
        log.warning("%s: llama.cpp does not know this tokenizer's pre-tokenizer (hash %s); writing 'default', which "
                    "may split text differently from the original", src, h[:12])  # fmt: skip
    ids = tok.encode("a")
    bos = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    eos = tok.eos_token_id is not None and len(ids) > 1 and ids[-1:] == [tok.eos_token_id]
    return PRE_TOKENIZERS.get(h, "default"), bos, eos


def _add_tensors(w, rec, reader: CheckpointReader, config: dict, names, types: dict, fam: gguf_names.Family,
                 mix: str, embedding_type: str, quiet: bool):  # fmt: skip
    """Add every tensor; returns (name -> (GGUF name, type, weights, bytes), and for each quantized linear by GGUF
    name: the largest |gguf-py's dequantization of its blocks - llmq's| (0: bit for bit), and the blocks' sha256)."""
    table, diffs, digests, done = {}, {}, {}, set()
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads

    def rows(hf_name: str, t):
        if not fam.permute:
            return t
        if ".q_proj." in hf_name:
            return gguf_names.rotary_permute(t, heads)
        if ".k_proj." in hf_name:
            return gguf_names.rotary_permute(t, kv_heads)
        return t

    experts: dict[str, dict[int, tuple]] = {}  # stacked GGUF name -> expert -> (blocks, llmq's dequantization)
    n_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)

    def add(gname: str, raw: torch.Tensor, want: torch.Tensor, btype: str, weights: int, hf: str) -> None:
        bt = ggml.TYPES[btype]
        w.add_tensor(gname, raw.numpy(), raw_shape=raw.shape, raw_dtype=bt.qtype)
        got = gguf.quants.dequantize(raw.numpy(), bt.qtype)
        diffs[gname] = float(np.abs(got - want.numpy()).max())
        digests[gname] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        table[hf] = (gname, bt.qtype.name, weights, raw.numel())

    for name, m in tqdm(rec.modules.items(), desc="export (gguf)", unit="linear", disable=quiet):
        keys = codec.module_keys(m, reader.keys())
        qw = codec.decode(m, reader.load(keys))
        gname = gguf_names.gguf_name(names, f"{name}.weight")
        done |= set(keys) | {f"{name}.weight"}
        e = gguf_names.expert_index(name)
        if e is None:
            raw = rows(name + ".", blocks_of(qw, types[name]))
            add(gname, raw, rows(name + ".", qw.dequantize(torch.float32)), types[name], qw.shape[0] * qw.shape[1],
                f"{name}.weight")  # fmt: skip
            continue
        stack = experts.setdefault(gname, {})
        stack[e] = (blocks_of(qw, types[name]), qw.dequantize(torch.float32))
        if len(stack) == n_experts:  # the layer's experts of this projection: one [E, rows, row bytes] tensor
            raw = torch.stack([stack[k][0] for k in range(n_experts)])
            want = torch.stack([stack[k][1] for k in range(n_experts)])
            add(gname, raw, want, types[name], want.numel(), gguf_names.stacked(f"{name}.weight"))
            del experts[gname]
    if experts:
        g, stack = next(iter(experts.items()))
        raise LlmqError(f"{g}: the checkpoint holds {len(stack)} of the config's {n_experts} experts; re-quantize")
    tied = bool(config.get("tie_word_embeddings"))
    for k in reader.keys():
        if k in done:
            continue
        t = reader.load([k])[k]
        gname = gguf_names.gguf_name(names, k)
        if not t.is_floating_point():
            raise LlmqError(f"{k}: a {t.dtype} tensor; the GGUF export writes float tensors only")
        t = rows(k, t.float())
        if fam.norm_shift and k.endswith("norm.weight"):
            t = t + fam.norm_shift  # convert_hf_to_gguf.py's Gemma norms: llama.cpp computes x * w
        if t.dim() == 1 or ".ffn_gate_inp" in gname:  # norms, biases, a mixture of experts' router (as the converter)
            arr, qtype = t.numpy(), gguf.GGMLQuantizationType.F32
            w.add_tensor(gname, arr)
        else:
            head = gname.startswith("output.") or (tied and gname.startswith("token_embd."))
            ty = embedding_type
            if ty == "auto":
                ty = recipes.output_type(mix, t.shape[1]) if head else \
                    (recipes.fitted(QuantScheme(format=recipes.MIXES[mix]), t.shape[1], k).format)
            arr, qtype = _plain(t, ty, k)
            w.add_tensor(gname, arr, raw_shape=arr.shape, raw_dtype=qtype)
        table[k] = (gname, qtype.name, t.numel(), arr.nbytes)
    return table, diffs, digests


def _plain(t: torch.Tensor, ty: str, name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A full-precision 2-D tensor in type `ty`: f16/f32, or a block type by round-to-nearest (as llama-quantize)."""
    if ty == "f32":
        return t.numpy(), gguf.GGMLQuantizationType.F32
    if ty == "f16" or ggml.fallback(ty, t.shape[1]) is None:
        return t.half().numpy(), gguf.GGMLQuantizationType.F16
    s = recipes.fitted(QuantScheme(format=ty), t.shape[1], name)
    return rtn(t, s).parts["qweight"].numpy(), s.block.qtype


def _verify(path: Path, digests: dict[str, str]) -> None:
    """Read the written file back: every quantized tensor holds exactly the blocks compared with llmq's
    dequantization before writing (their sha256), so nothing of the model is kept in memory for this."""
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    missing = sorted(set(digests) - set(written))
    if missing:
        raise LlmqError(f"{path}: tensors {missing[:3]} were not written")
    for name, digest in digests.items():
        if hashlib.sha256(np.asarray(written[name].data).tobytes()).hexdigest() != digest:
            raise LlmqError(f"{path}: tensor {name} was written with other bytes than its blocks")


def _summary(src: Path, dest: Path, mix: str, table: dict, diffs: dict, meta_src, secs: float) -> dict:
    weights = sum(v[2] for v in table.values())
    data = sum(v[3] for v in table.values())
    lin = [v for v in table.values() if v[0] in diffs]
    return {"source": str(src), "dest": str(dest), "to": NAME, "mix": mix, "file_bytes": dest.stat().st_size,
            "bits_per_weight": 8 * data / weights,
            "linear_bits_per_weight": 8 * sum(v[3] for v in lin) / max(sum(v[2] for v in lin), 1),
            "types": dict(Counter(v[1] for v in table.values())),
            "tensors": {v[0]: v[1] for v in table.values()}, "exact_modules": sum(d == 0 for d in diffs.values()),
            "modules": len(diffs), "max_weight_diff": max(diffs.values(), default=0.0),
            "metadata_from": str(meta_src) if meta_src else "config.json and tokenizer.json",
            "seconds": round(secs, 2), "versions": versions()}  # fmt: skip


def print_summary(s: dict) -> None:
    types = ", ".join(f"{k} {v}" for k, v in sorted(s["types"].items()))
    exact = "bit for bit" if s["exact_modules"] == s["modules"] else f"{s['exact_modules']}/{s['modules']} bit for bit"
    print(f"wrote {s['dest']}: {s['file_bytes'] / 2**20:.1f} MiB, {s['bits_per_weight']:.3f} bits per weight "
          f"({s['linear_bits_per_weight']:.3f} in the quantized linears); tensors: {types}; the {s['modules']} "
          f"quantized linears equal llmq's dequantization {exact}; metadata from {s['metadata_from']}")  # fmt: skip

