"""llama.cpp on a GGUF file, through llama-cpp-python's low-level API: the other system `tinyllama check --model
file.gguf` reports beside this engine, and the tokenizer tests' second reference. Imported only when asked for;
`available()` says whether llama-cpp-python is installed.

`LlamaCpp(path)` loads the file once; `logits(ids)` is its logits at every position (what `Llama(logits_all=True)`
keeps), `greedy(ids, n)` its own greedy tokens, `tokenize(text)` its tokenizer (special tokens parsed, BOS as the
file says). The AMX / repacked buffer types are left out where they crash quantized types on this CPU (see
bench.llamacpp.amx_build: the same check).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str | None:
    """The installed llama-cpp-python's version."""
    try:
        from importlib.metadata import version as v

        return v("llama-cpp-python")
    except Exception:  # not installed
        return None


def _amx_build(L) -> bool:
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_int8" in cpu and "AMX_INT8 = 1" in L.llama_print_system_info().decode(errors="replace")


class LlamaCpp:
    """A GGUF file loaded by llama.cpp (vocabulary and weights), with one context of `n_ctx` positions."""

    def __init__(self, path, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False):
        """vocab_only: load the vocabulary alone (for `tokenize`; no weights, no context)."""
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.vocab_only = vocab_only
        if hasattr(mp, "use_extra_bufts") and _amx_build(L):
            mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        if vocab_only:
            return
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = min(512, n_ctx)
        p.n_threads = p.n_threads_batch = threads or max(1, len(os.sched_getaffinity(0)))
        self.ctx = L.llama_init_from_model(self.model, p)
        self.n_ctx, self.n_batch = n_ctx, p.n_batch

    def close(self) -> None:
        """Free the context and the model."""
        if self.ctx:
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _clear(self) -> None:
        L = self.L
        if hasattr(L, "llama_get_memory"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        else:  # older llama-cpp-python
            L.llama_kv_cache_clear(self.ctx)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed `ids` at positions start.. -> logits of every row (all_logits) or of the last: (n or 1, vocab)."""
        L = self.L
        rows = []
        for first in range(0, len(ids), self.n_batch):
            chunk = ids[first : first + self.n_batch]
            batch = L.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, tok in enumerate(chunk):
                    batch.token[i], batch.pos[i] = int(tok), start + first + i
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                    batch.logits[i] = all_logits or first + i == len(ids) - 1
                batch.n_tokens = len(chunk)
                if L.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                for i in range(len(chunk)):
                    if batch.logits[i]:
                        rows.append(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i),
                                                          shape=(self.n_vocab,)).copy())
            finally:
                L.llama_batch_free(batch)
        return np.stack(rows).astype(np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        """llama.cpp's logits at every position of `ids` in a new sequence: (len(ids), vocab) float32."""
        self._clear()
        return self._decode(list(ids), 0, True)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """llama.cpp's own greedy continuation of `ids` (n tokens, through its KV cache; EOS not special)."""
        self._clear()
        last = self._decode(list(ids), 0, False)[-1]
        out = []
        for step in range(n):
            out.append(int(np.argmax(last)))
            if step + 1 < n:
                last = self._decode([out[-1]], len(ids) + step, False)[-1]
        return out

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's token ids of `text` (special tokens written in the text parsed as such; BOS when the file's
        add_bos says so and add_special)."""
        L = self.L
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, True)
        return list(buf[:n])
