"""A model whose decoder layers stay on disk until needed: the memory contract of `llmq quantize`.

The model is built on the meta device (buffers such as rotary frequencies are real, they are computed,
not stored). Tensors outside the decoder layers (embeddings, final norm, head) are read once; each decoder
layer is read from its shards (`safetensors.safe_open`, one tensor at a time) only while it is processed,
then released back to the meta device. Peak memory is then the calibration activations, one layer in full
precision with its Hessians, and the embeddings/head.

Streaming needs safetensors shards (a model dir, or a hub snapshot). Other inputs (a `.gguf` file, whose
transformers loader dequantizes the whole model at once) are loaded whole; `streamed` says which.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM

from . import moe
from .archs import ArchSpec, decoder_layers
from .checkpoint import read_index
from .errors import LlmqError
from .rotation import Rotation
from .sources import Source, load_model

log = logging.getLogger("llmq")


class LazyModel:
    """`rotation` (rotation.Rotation): fused into every tensor as it is read, so everything downstream (calibration,
    sensitivity, RTN, GPTQ, the written checkpoint) sees the rotated model; a tied head becomes its own tensor."""

    def __init__(self, src: Source, config, spec: ArchSpec, dtype: torch.dtype = torch.float32,
                 rotation: Rotation | None = None):  # fmt: skip
        self.src, self.spec, self.dtype, self.rotation = src, spec, dtype, rotation
        self.head_from_embedding = False  # a tied head, untied for the rotation: made from the embedding table
        path = Path(src.path)
        if src.kind == "hub":
            path = self._snapshot(src.path)
        self.dir = path
        self.weight_map = read_index(path)[0] if src.kind != "gguf" else {}
        self.streamed = bool(self.weight_map)
        if not self.streamed:
            log.info("%s: not a safetensors checkpoint, loading it whole (no layer streaming)", src)
            self.model, _ = load_model(src, dtype)
            moe.unfuse(self.model)
            if rotation is not None:  # resident: rotated once, whole
                rotation.whole(self.model)
            return
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        moe.unfuse(self.model)  # experts as linears; read from per-expert or fused tensors (_where)
        self._prefix = self._key_prefix()
        self._check_experts()
        layer_prefix = spec.layers + "."
        # embeddings, final norm, head: not held while layers are processed (only calibration needs the
        # embeddings, and the output needs them all at the end): see load_rest / release_rest
        self.rest = [k for k in self.model.state_dict() if not k.startswith(layer_prefix)]
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [k for k in self.rest if self._where(k)[0] is None
                   and not (tied and k.endswith("lm_head.weight"))]  # fmt: skip
        if missing:
            raise LlmqError(f"{self.dir}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")
        if rotation is not None:
            self.head_from_embedding = rotation.untie(self.model)

    @staticmethod
    def _snapshot(repo: str) -> Path:
        try:
            return Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt",
                                                                "*.jinja", "*.tiktoken"]))  # fmt: skip
        except Exception as e:  # the hub client raises many types for "unreachable"; all mean the same here
            raise LlmqError(f"{repo}: cannot download from the Hugging Face Hub ({type(e).__name__}); pass a local "
                            "model dir or .gguf file") from None  # fmt: skip

    def _key_prefix(self) -> str:
        """Some checkpoints store names without the base model prefix (e.g. GPT-2's 'h.0...' for 'transformer.h.0...')."""
        names = list(self.model.state_dict())
        if any(n in self.weight_map for n in names):
            return ""
        base = getattr(self.model, "base_model_prefix", "")
        return base + "." if base and any(n.removeprefix(base + ".") in self.weight_map for n in names) else ""

    def _file_key(self, name: str) -> str:
        return name.removeprefix(self._prefix) if self._prefix else name

    def _where(self, name: str) -> tuple[str | None, tuple | None]:
        """(checkpoint key, None) of a model tensor, or (key of the fused 3-D tensor, (experts module, expert, what))
        for an expert's tensor stored fused; (None, None) when the checkpoint lacks it."""
        key = self._file_key(name)
        if key in self.weight_map:
            return key, None
        mt = self.model.config.model_type
        x = moe.EXPERT_RE.match(name.rpartition(".")[0])
        if x is None:
            r = moe.renamed(mt, key)
            return (r, None) if r in self.weight_map else (None, None)
        what = name.rpartition(".")[2]
        for k in moe.disk_keys(mt, self._file_key(x["set"]), int(x["e"]), x["proj"], what):
            if k in self.weight_map:
                return k, None
        fused = moe.fused_key(self._file_key(x["set"]), x["proj"], what)
        if fused in self.weight_map:
            return fused, (self.model.get_submodule(x["set"]), int(x["e"]), f"{x['proj']}.{what}")
        return None, None

    def _check_experts(self) -> None:
        """Before any work: every expert's tensors are in the checkpoint, and it holds no more experts than the config
        says (a checkpoint of another model, or a config edited by hand)."""
        for path in moe.expert_sets(self.model):
            experts = self.model.get_submodule(path)
            missing = [f"{path}.{n}" for n, _ in experts.named_parameters() if self._where(f"{path}.{n}")[0] is None]
            if missing:
                raise LlmqError(f"{self.dir}: the checkpoint lacks expert tensor(s) of {path} ({len(missing)}, e.g. "
                                f"{', '.join(missing[:3])}; looked for them as "
                                f"{', '.join(moe.disk_keys(self.model.config.model_type, path, 0, 'gate_proj'))} "
                                "and fused); the download is incomplete or the config is not this checkpoint's")  # fmt: skip
            e = experts.num_experts
            extra = moe.disk_keys(self.model.config.model_type, self._file_key(path), e, "gate_proj")
            if any(k in self.weight_map for k in extra):
                on_disk = e
                while any(k in self.weight_map for k in moe.disk_keys(self.model.config.model_type,
                                                                      self._file_key(path), on_disk, "gate_proj")):
                    on_disk += 1
                raise LlmqError(f"{self.dir}: {path} holds {on_disk} experts in the checkpoint but the config says {e} "
                                "(num_experts / num_local_experts / n_routed_experts): the config is not this "
                                "checkpoint's")  # fmt: skip

    def load_rest(self, dtype: torch.dtype | None = None, head: bool = True) -> None:
        """Load the tensors outside the decoder layers (embeddings, norm, head), in `dtype` (default: the
        model's compute dtype; the storage dtype when they are only going to be written). head=False leaves
        the output head on disk (calibration stops at layer 0 and never needs it)."""
        if self.streamed:
            out = self.model.get_output_embeddings()
            head_names = {n for n, p in self.model.named_parameters() if out is not None and any(p is q for q in out.parameters())}
            names = [k for k, v in self.model.state_dict().items() if k in self.rest and v.is_meta
                     and (head or k not in head_names)]  # fmt: skip
            self._load(names, required=False, dtype=dtype)
            self.model.tie_weights()
            if self.rotation is not None:  # fused into what was just read (every later load follows a release)
                fresh = {n for n in names if not self.model.get_parameter(n).is_meta}
                emb = next(n for n, p in self.model.named_parameters() if p is self.model.get_input_embeddings().weight)
                build = head and (bool(head_names & fresh) or self.head_from_embedding)
                if build and self.head_from_embedding and emb not in fresh:
                    raise LlmqError("internal: an untied head is made from the unrotated embeddings; load them together")
                self.rotation.rest(self.model, embedding=emb in fresh, head=build,
                                   head_from_embedding=self.head_from_embedding)  # fmt: skip

    def release_rest(self) -> None:
        if self.streamed:
            for name, _ in list(self.model.named_parameters()):
                if name in self.rest:
                    _release(self.model, name)
            self.model.tie_weights()  # a tied head still pointed at the old embedding
            trim_heap()

    def _load(self, names: list[str], required: bool = True, dtype: torch.dtype | None = None) -> None:
        by_shard: dict[str, list[tuple[str, str, tuple | None]]] = {}
        for n in names:
            key, part = self._where(n)
            if key is None:
                if required:
                    raise LlmqError(f"{self.dir}: tensor {n!r} is missing from the checkpoint")
                continue
            by_shard.setdefault(self.weight_map[key], []).append((n, key, part))
        for shard, ns in by_shard.items():
            try:
                with safe_open(self.dir / shard, "pt") as f:
                    for n, key, part in ns:
                        if part is None:
                            t = f.get_tensor(key)
                        else:  # one expert's slice of a fused tensor (gpt-oss), de-interleaved by the module
                            experts, e, what = part
                            one = f.get_slice(key)[e : e + 1]
                            fused = {"gate_up": one} if what.startswith(("gate", "up")) else {"down": one}
                            if what.endswith("bias"):
                                fused = {f"{k}_bias": v for k, v in fused.items()}
                            t = experts.split(0, **fused)[what].contiguous()
                        dt = dtype or self.dtype
                        set_module_tensor_to_device(self.model, n, "cpu", value=t.to(dt) if t.is_floating_point() else t,
                                                    dtype=dt if t.is_floating_point() else None)  # fmt: skip
            except SafetensorError as e:
                raise LlmqError(f"{self.dir / shard}: unreadable safetensors file ({e}); it is truncated or corrupted") from None

    def layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i with its weights in memory."""
        layer = decoder_layers(self.model, self.spec)[i]
        if self.streamed:
            prefix = f"{self.spec.layers}.{i}."
            meta = [prefix + k for k, v in layer.state_dict().items() if v.is_meta]
            self._load(meta)
            if meta and self.rotation is not None:  # freshly read: rotated once (release() makes it meta again)
                self.rotation.layer(layer)
        return layer

    def release(self, i: int) -> None:
        """Give decoder layer i's memory back (its parameters return to the meta device)."""
        if self.streamed:
            layer = decoder_layers(self.model, self.spec)[i]
            for name, _ in list(layer.named_parameters()):
                _release(layer, name)
        trim_heap()



def _release(module: torch.nn.Module, name: str) -> None:
    mod, _, attr = name.rpartition(".")
    owner = module.get_submodule(mod) if mod else module
    if attr in owner._parameters:
        p = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def trim_heap(collect: bool = True) -> None:
    """Free what is only held by reference cycles, and return freed heap memory to the OS.

    Cycles: the pipeline stops forward passes by raising from a hook, and each such traceback's frames hold
    that pass's activations in a cycle that only the cyclic GC frees — rarely, since few Python objects
    are allocated meanwhile. glibc keeps freed blocks up to its (dynamic, up to 32 MB) mmap threshold in the
    heap, so without the trim each released layer left about half its size resident. Both measured:
    benchmarks/results/notes.md. `collect=False` only returns the heap's free memory (cheap: the GPTQ pipeline
    clears its stopped passes' frames itself, and trims after each group's GPTQ so freed Hessians do not stay
    resident)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
