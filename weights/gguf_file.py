"""A GGUF file (llama.cpp's format) as a checkpoint source: its config, tokenizer description and tensors.

Read with llama.cpp's own reader (the `gguf` package, gguf-py): the file is memory-mapped and each tensor's bytes are
a NumPy view on the mapping, never copied here. This module knows the file's conventions, not the math:
- the model's config from the `llama.*` metadata, as a Hugging Face config.json dict (`config_dict`);
- the tokenizer's description from `tokenizer.ggml.*` and `tokenizer.chat_template` (`tokenizer_metadata`);
- tensors under their Hugging Face names (token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.
  self_attn.q_proj, ...), each with its ggml type name, its shape in Hugging Face's [out, in] order and its rows as
  a uint8 view (rows, row_bytes) of the mapping (`rows`);
- llama.cpp's converter stores the rows of q_proj and k_proj permuted for its rotary layout (each head's two halves
  interleaved): `hf_row_order(name)` is the index array that puts them back in Hugging Face's order.
Anything a user's file can get wrong is a CheckpointError naming the file: not a GGUF (magic), a version the reader
does not handle, a truncated file, an architecture other than llama, missing or inconsistent metadata, a tensor
whose shape disagrees with the metadata, missing tokenizer metadata.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weights.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py reads
ARCHITECTURES = ("llama",)  # what runs: Llama-architecture models (TinyLlama, Llama 2/3, Mistral-style dense)
# GGUF tensor names -> Hugging Face names (per layer: blk.N. -> model.layers.N.)
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
               "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
               "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight"}
# Tensors llama.cpp writes that carry no weights this engine needs (rotary tables it can recompute).
IGNORED = ("rope_freqs.weight",)
IGNORED_LAYER = ("rot_embd.weight",)
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
PAGE = mmap.PAGESIZE


def is_gguf_path(ref: str) -> bool:
    """Whether a model reference names a GGUF file (by its .gguf suffix, or an existing file starting with b'GGUF')."""
    if ref.lower().endswith(".gguf"):
        return True
    path = Path(ref).expanduser()
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its Hugging Face name, the name in the file, ggml type name, shape ([out, in] for a
    matrix), absolute byte range in the file."""

    name: str
    file_name: str
    type_name: str
    shape: tuple[int, ...]
    begin: int
    end: int


class GGUFFile:
    """An open GGUF file: `metadata` (key -> Python value), `tensors` (Hugging Face name -> GGUFTensor), rows of any
    tensor as uint8 views of the file's memory map. Opening validates the file's structure; `config_dict()` and
    `tokenizer_metadata()` validate what they read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._reader = None
        self._check_head()
        try:
            self._reader = _reader_class()(self.path, "r")
        except (ValueError, IndexError, KeyError, TypeError, struct.error) as e:
            raise self._fail(f"truncated or corrupt GGUF file ({self.size} bytes): {_first_line(e)}") from None
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror or e}") from None
        self.metadata = {name: _field_value(field) for name, field in self._reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.version = int(self._reader.fields["GGUF.version"].parts[0][0])
        self._reader.fields.clear()  # a vocabulary's fields are ~3 small arrays per token: kept as `metadata` instead
        self.tensors = self._tensor_table()

    # -- structure ---------------------------------------------------------------------------------------------

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _check_head(self) -> None:
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
        except FileNotFoundError:
            raise self._fail("no such file") from None
        except IsADirectoryError:
            raise self._fail("is a folder, not a GGUF file") from None
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror or e}") from None
        if len(head) < 8:
            raise self._fail(f"truncated file ({self.size} bytes): too short to hold a GGUF header")
        if head[:4] != GGUF_MAGIC:
            raise self._fail(f"not a GGUF file (it starts with {head[:4]!r}, a GGUF file with b'GGUF')")
        version = struct.unpack("<I", head[4:8])[0]
        if version not in VERSIONS:
            raise self._fail(f"GGUF version {version}, which this reader does not handle (versions "
                             f"{', '.join(map(str, VERSIONS))})")

    def _tensor_table(self) -> dict[str, GGUFTensor]:
        table: dict[str, GGUFTensor] = {}
        for t in self._reader.tensors:
            begin, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
            if end > self.size:
                raise self._fail(f"truncated file: tensor '{t.name}' ends at byte {end} but the file has "
                                 f"{self.size} bytes")
            name = hf_name(t.name)
            if name is None:
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml's ne reversed: [out, in]
            table[name] = GGUFTensor(name, t.name, t.tensor_type.name, shape, begin, end)
        self._by_file_name = {t.name: t for t in self._reader.tensors}
        return table

    @property
    def header_bytes(self) -> int:
        """Bytes of the file before its tensor data: the metadata and the tensor table (a cheap fingerprint)."""
        return int(self._reader.data_offset)

    @property
    def architecture(self) -> str:
        """general.architecture ("llama", "qwen2", ...)."""
        return str(self.metadata.get("general.architecture", ""))

    def check_architecture(self) -> None:
        """CheckpointError unless general.architecture is one this engine runs (naming what runs)."""
        arch = self.architecture
        if arch not in ARCHITECTURES:
            found = repr(arch) if arch else "none"
            raise self._fail(f"architecture {found}: this engine runs {', '.join(ARCHITECTURES)} "
                             "(TinyLlama, Llama and other Llama-architecture models)")

    # -- config ------------------------------------------------------------------------------------------------

    def _key(self, suffix: str, required: bool = True, default=None):
        key = f"{self.architecture}.{suffix}"
        if key not in self.metadata:
            if required:
                raise self._fail(f"missing metadata '{key}'")
            return default
        return self.metadata[key]

    def config_dict(self) -> dict:
        """The model's config as a Hugging Face config.json dict (engine.config.ModelConfig.from_dict reads it), from
        the `llama.*` metadata with llama.cpp's defaults for the optional keys; the vocabulary size from
        llama.vocab_size or the token list."""
        self.check_architecture()
        heads = self._key("attention.head_count")
        if isinstance(heads, list):
            raise self._fail("per-layer head counts (llama.attention.head_count is an array) are not supported")
        hidden = self._key("embedding_length")
        kv_heads = self._key("attention.head_count_kv", False, heads)
        head_dim = self._key("attention.key_length", False, None)
        if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            head_dim = hidden // heads
        rope_dim = self._key("rope.dimension_count", False, head_dim)
        if rope_dim != head_dim:
            raise self._fail(f"rotary dimension {rope_dim} differs from the head size {head_dim} (partial rotary "
                             "embeddings are not supported)")
        vocab = self._key("vocab_size", False, None)
        if vocab is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) else None
        if vocab is None and "token_embd.weight" in self._by_file_name:
            vocab = int(self._by_file_name["token_embd.weight"].shape[-1])
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": self._key("feed_forward_length"),
            "num_hidden_layers": self._key("block_count"),
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "max_position_embeddings": self._key("context_length"),
            "rms_norm_eps": _shortest(self._key("attention.layer_norm_rms_epsilon")),
            "rope_theta": _shortest(self._key("rope.freq_base", False, 10000.0)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
        }
        if isinstance(bos := self.metadata.get("tokenizer.ggml.bos_token_id"), int):
            config["bos_token_id"] = bos
        eos = [self.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
        eos = list(dict.fromkeys(e for e in eos if isinstance(e, int)))
        if eos:
            config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        scaling = self._key("rope.scaling.type", False, None)
        if scaling not in (None, "none"):
            factor = self._key("rope.scaling.factor", False, None)
            if scaling != "linear" or factor is None:
                raise self._fail(f"rope scaling {scaling!r} is not supported (runs: none, linear)")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        if "rope_freqs.weight" in self._by_file_name:
            raise self._fail("per-frequency rope factors (rope_freqs, Llama 3.1 style scaling) are not supported")
        return config

    def dtype_label(self) -> str:
        """general.file_type as llama.cpp names it (e.g. "MOSTLY_Q4_K_M"), else the most common matrix type."""
        file_type = self.metadata.get("general.file_type")
        try:
            from gguf import LlamaFileType

            return LlamaFileType(file_type).name.replace("MOSTLY_", "") if file_type is not None else ""
        except (ImportError, ValueError):
            return ""

    # -- tensors -----------------------------------------------------------------------------------------------

    def validate(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Exactly the `expected` tensors (those in `optional` may be absent) with their shapes; CheckpointError
        naming the tensor (by its name in the file) otherwise."""
        for name, shape in expected.items():
            t = self.tensors.get(name)
            if t is None:
                if name in optional:
                    continue
                raise self._fail(f"missing tensor '{gguf_name(name)}' (expected shape {list(reversed(shape))} "
                                 "in ggml's order)")
            if t.shape != tuple(shape):
                raise self._fail(f"tensor '{t.file_name}' has shape {list(reversed(t.shape))} (ggml's order), but "
                                 f"the metadata implies {list(reversed(shape))}")
        for name, t in self.tensors.items():
            if name not in expected:
                raise self._fail(f"unexpected tensor '{t.file_name}' for this config")

    def rows(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Tensor `name`'s stored rows as a read-only uint8 view (n, row_bytes) of the memory map (an index array
        gathers a copy of those rows)."""
        t = self.tensors[name]
        count = t.shape[0] if len(t.shape) > 1 else 1
        raw = self._reader.data[t.begin : t.end].reshape(count, -1)
        return raw if rows is None else raw[rows]

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop the pages of tensor `name` (or of its `rows`) from this process's memory (MADV_DONTNEED on the
        read-only mapping; they are read again from the page cache if touched): a load holds what it made, not the
        file too."""
        t = self.tensors[name]
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is None:
            return
        begin, end = t.begin, t.end
        if rows is not None:
            count = t.shape[0] if len(t.shape) > 1 else 1
            row_bytes = (t.end - t.begin) // count
            first, last, _ = rows.indices(count)
            begin, end = t.begin + first * row_bytes, t.begin + last * row_bytes
        start = begin - begin % PAGE
        if end <= start:
            return
        try:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def hf_row_order(self, name: str, config: dict) -> np.ndarray | None:
        """For q_proj / k_proj: the file's row index of each Hugging Face row (llama.cpp's converter interleaves the
        two halves of every head for its rotary layout: file row h*d + 2j + i holds HF row h*d + i*d/2 + j); None for
        any other tensor."""
        if name.endswith("self_attn.q_proj.weight"):
            heads = config["num_attention_heads"]
        elif name.endswith("self_attn.k_proj.weight"):
            heads = config["num_key_value_heads"]
        else:
            return None
        rows = self.tensors[name].shape[0]
        half = rows // heads // 2
        # file index of HF row (h, i, j) is h*2*half + 2j + i
        return np.arange(rows).reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they go)."""
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- tokenizer ---------------------------------------------------------------------------------------------

    def tokenizer_metadata(self) -> dict:
        """Every `tokenizer.*` metadata value (tokenizer.ggml.model, tokens, scores, token_type, merges, the special
        token ids, add_bos_token, tokenizer.chat_template, ...) by key; CheckpointError when the file has no
        vocabulary (tokenizer.ggml.model and tokenizer.ggml.tokens)."""
        found = {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
            if key not in found:
                raise self._fail(f"missing tokenizer metadata '{key}' (this file carries no vocabulary)")
        return found


def _reader_class():
    """gguf-py's GGUFReader, its byte accessor `_get` slicing a plain ndarray view of the file's np.memmap: every
    slice of a memmap runs memmap.__array_finalize__, and the reader takes ~4 slices per vocabulary entry (a 32000-token
    vocabulary: 2.5x faster). The parsing itself is gguf-py's; a gguf-py whose reader has no `_get` is used as it is."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a declared dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    if not hasattr(GGUFReader, "_get"):  # pragma: no cover - another gguf-py layout
        return GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def hf_name(file_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (None for tensors this engine does not need); unknown names are
    kept as they are (so validation reports them)."""
    if file_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[file_name]
    if file_name in IGNORED:
        return None
    m = _LAYER.fullmatch(file_name)
    if m:
        if m.group(2) in IGNORED_LAYER:
            return None
        if m.group(2) in LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return file_name


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of a Hugging Face one (the inverse of hf_name)."""
    for k, v in GLOBAL_NAMES.items():
        if v == hf:
            return k
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        for k, v in LAYER_NAMES.items():
            if v == m.group(2):
                return f"blk.{m.group(1)}.{k}"
    return hf


def _field_value(field):
    """A gguf-py ReaderField as a Python value: str, int, float, bool, or a list of them (token arrays)."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(field.types) == 2 and field.data:
            # numeric arrays: one part per element, all of one dtype -> a list in one go
            first = field.data[0]
            values = np.concatenate([field.parts[i] for i in field.data]) if len(field.data) > 1 else field.parts[first]
            return values.tolist()
        return [] if len(field.types) == 2 else field.contents()
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    value = field.parts[-1].tolist()[0]
    return value


def _shortest(value):
    """A float32 metadata value as the shortest decimal that is the same float32 (9.999999747378752e-06 -> 1e-05);
    anything else as it is."""
    if isinstance(value, float):
        return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
