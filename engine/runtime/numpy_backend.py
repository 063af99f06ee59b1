"""The NumPy backend: one forward implementation for every batch shape (prefill, decode, batched, verification)."""
from __future__ import annotations

import numpy as np

from engine.runtime.batch import SequenceStep
from engine.config import ModelConfig
from engine.runtime.kv_cache import KVCache
from engine.runtime import layers, native
from engine.runtime.layers import add_rms_norm, attention, linear, rms_norm, rotate_heads, swiglu
from engine.runtime.weights import ModelWeights, embed_rows, is_quantized
from engine.runtime.rope import rope_tables


PASS_ROWS = 512  # most tokens per pass through the layers (a 2000-token prompt runs in 4 passes)


def split_into_passes(steps: list[SequenceStep], rows: int) -> list[list[tuple[int, SequenceStep, bool]]]:
    """The steps cut into passes of at most `rows` tokens, each sequence's tokens in order across passes: per pass a
    list of (index of the step, the piece to run, whether it is the step's last piece)."""
    passes, current, room = [], [], rows
    for j, step in enumerate(steps):
        ids = step.token_ids
        while len(ids):
            if room == 0:
                passes.append(current)
                current, room = [], rows
            piece, ids = ids[:room], ids[room:]
            current.append((j, SequenceStep(step.cache, piece, all_logits=step.all_logits), len(ids) == 0))
            room -= len(piece)
    passes.append(current)
    return passes


class NumpyBackend:
    """Runs a Llama model on the CPU: NumPy for the elementwise work, our compiled kernels (engine.runtime.native) for
    the matmuls and attention, OpenBLAS where they are not available. Activations, KV cache and logits are float32;
    weights are float32 or the checkpoint's 16-bit dtype (widened exactly inside the kernels)."""

    name = "numpy"
    # Run a pass's layers in one kernel call (native.DecoderLayers: the same kernels in the same order as the loop in
    # _forward_pass, so the same bits) where every matmul of the pass runs on the kernels and nothing is traced.
    # False: always the loop (tests compare the two).
    fuse_layers = True

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        self.config = config
        self.weights = weights
        self.eps = np.float32(config.rms_norm_eps)
        self.cos, self.sin = rope_tables(config)  # (max_pos, head_dim) each
        self._fused: native.DecoderLayers | None = None
        self._fused_key: list[int] = []

    @property
    def weights_dtype(self) -> str:
        """How the weight matrices are held: "bfloat16", "float16" or "float32"."""
        return self.weights.dtype

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.max_position_embeddings)

    def forward(self, steps: list[SequenceStep], recorder=None) -> list[np.ndarray]:
        """Run the new tokens of every step through the model, appending their K/V to each step's cache.

        All sequences' tokens are stacked into one (N, hidden) matrix so each weight matrix is read once per pass;
        attention runs per sequence over its own cache. More than PASS_ROWS tokens run as several passes (a long
        prompt in pieces, in order), so activations take O(PASS_ROWS) memory whatever the prompt; the kernels give
        every row the same bits either way. Returns per step logits (n or 1, vocab) float32.
        recorder: None, or an engine.runtime.trace.TraceRecorder for one step that is handed the embeddings, each
        layer's output, the final-normed hidden states and (where it asks) the attention probabilities; a traced
        step runs in one pass (its size is bounded by the trace's own memory guard).
        """
        for s in steps:
            s.cache.reserve(s.cache.length + len(s.token_ids))  # raises before any cache is touched on overflow
        blas_from = layers.widened_blas_from_rows()
        long = [len(s.token_ids) >= blas_from for s in steps]
        if long != sorted(long):  # long prompt chunks stacked last, so `linear` can give their rows to OpenBLAS
            order = sorted(range(len(steps)), key=lambda j: long[j])  # stable: the others first, in order
            out: list = [None] * len(steps)
            for j, logits in zip(order, self.forward([steps[j] for j in order])):
                out[j] = logits
            return out
        if recorder is not None or sum(len(s.token_ids) for s in steps) <= PASS_ROWS:
            return self._forward_pass(steps, recorder)
        outputs: list[list[np.ndarray]] = [[] for _ in steps]
        for part in split_into_passes(steps, PASS_ROWS):
            for (j, piece, last), logits in zip(part, self._forward_pass([piece for _, piece, _ in part])):
                if steps[j].all_logits or last:
                    outputs[j].append(logits)
        return [np.concatenate(o) if len(o) > 1 else o[0] for o in outputs]

    def _forward_pass(self, steps: list[SequenceStep], recorder=None) -> list[np.ndarray]:
        """One pass of `forward` over steps whose caches have room reserved (long prompt chunks last, see forward)."""
        c, w = self.config, self.weights
        blas_from = layers.widened_blas_from_rows()
        prompt_from = sum(n for n in (len(s.token_ids) for s in steps) if n < blas_from)
        if recorder is not None and len(steps) != 1:
            raise ValueError("a traced forward runs one sequence step")
        starts = [s.cache.length for s in steps]
        counts = [len(s.token_ids) for s in steps]
        token_ids = np.concatenate([s.token_ids for s in steps])
        positions = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
        x = embed_rows(w.embed, token_ids)  # (N, H) float32: the residual stream
        if recorder is not None:
            recorder.record_hidden(0, x)
        h = rms_norm(x, w.layers[0].attn_norm, self.eps)  # each layer ends with the next one's input norm
        # With the compiled kernels every sequence's cache write and attention is one call per layer.
        step_attention = (native.StepAttention([s.cache for s in steps], starts, counts, c.num_attention_heads,
                                               c.head_dim) if native.status().available else None)
        if recorder is not None:  # a trace asks for probabilities: a call per sequence (the same output bits)
            step_attention = None
        fused = self._fused_layers(len(token_ids), prompt_from) if step_attention is not None else None
        if fused is not None:
            x, h = np.ascontiguousarray(x), np.ascontiguousarray(h)
            fused(x, h, positions, step_attention)  # every layer; h is then the final norm's output
        else:
            for i, layer in enumerate(w.layers):
                qkv = linear(h, layer.wqkv, prompt_from)  # (N, Q + 2KV)
                rotate_heads(qkv, positions, self.cos, self.sin, c.num_attention_heads + c.num_key_value_heads,
                             c.head_dim)
                if step_attention is not None:
                    attn = step_attention(qkv, i)  # (N, Q)
                elif recorder is not None:
                    attn = self._attention_per_sequence(qkv, steps, starts, counts, i, recorder)
                else:
                    attn = self._attention_per_sequence(qkv, steps, starts, counts, i)
                x, h = add_rms_norm(x, linear(attn, layer.wo, prompt_from), layer.mlp_norm, self.eps)
                next_norm = w.layers[i + 1].attn_norm if i + 1 < len(w.layers) else w.final_norm
                mlp = linear(swiglu(linear(h, layer.w_gate_up, prompt_from)), layer.w_down, prompt_from)
                x, h = add_rms_norm(x, mlp, next_norm, self.eps)  # after the last layer h is the final norm's output
                if recorder is not None and i + 1 < len(w.layers):
                    recorder.record_hidden(i + 1, x)
        for s, start, n in zip(steps, starts, counts):
            s.cache.length = start + n
        if recorder is not None:
            recorder.record_hidden(len(w.layers), h)
        return self._logits(h, steps, counts)

    def _fused_layers(self, rows: int, prompt_from: int) -> native.DecoderLayers | None:
        """The layers as one kernel call for a pass of `rows` rows, or None where the loop must run them (fusing off,
        some rows for OpenBLAS). Built once, and again whenever a weight array has been replaced."""
        w = self.weights
        quantized = is_quantized(w)  # every row of a quantized matmul runs on the kernels
        if not self.fuse_layers or not (quantized or layers.runs_on_kernels(rows, prompt_from, w.layers[0].wqkv.dtype)):
            return None
        norms = [layer.attn_norm for layer in w.layers[1:]] + [w.final_norm]
        arrays = [(l.wqkv, l.wo, l.w_gate_up, l.w_down, l.mlp_norm, n) for l, n in zip(w.layers, norms)]
        key = [id(a) for group in arrays for a in group]  # the stack keeps its arrays alive: ids are not re-used
        if key != self._fused_key:
            c = self.config
            try:
                self._fused = native.DecoderLayers(arrays, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                                   c.num_key_value_heads, c.head_dim, self.eps, self.cos, self.sin)
            except ValueError:  # weights the kernels cannot take in one call (e.g. mixed dtypes): the loop
                self._fused = None
            self._fused_key = key
        return self._fused

    def _attention_per_sequence(self, qkv: np.ndarray, steps: list[SequenceStep], starts: list[int],
                                counts: list[int], i: int, recorder=None) -> np.ndarray:
        """Layer i's attention, a call per sequence: qkv (N, Q + 2KV) rotated -> (N, Q) float32, each sequence's new
        keys and values stored in its cache first; the recorder (a trace) gets the probabilities it asks for."""
        c = self.config
        n_tok, q_end, k_end = qkv.shape[0], c.q_size, c.q_size + c.kv_size
        q = qkv[:, :q_end].reshape(n_tok, c.num_attention_heads, c.head_dim)
        k = qkv[:, q_end:k_end].reshape(n_tok, c.num_key_value_heads, c.head_dim)
        v = qkv[:, k_end:].reshape(n_tok, c.num_key_value_heads, c.head_dim)
        attn = np.empty((n_tok, c.q_size), dtype=np.float32)
        row = 0
        for s, start, n in zip(steps, starts, counts):
            s.cache.write(i, start, k[row : row + n], v[row : row + n])
            keys, values = s.cache.layer(i, start + n)
            if recorder is not None and recorder.wants_attention(i):
                attn[row : row + n], probs = attention(q[row : row + n], keys, values, start, return_probs=True)
                recorder.record_attention(i, probs)
            else:
                attn[row : row + n] = attention(q[row : row + n], keys, values, start)
            row += n
        return attn

    def _logits(self, h: np.ndarray, steps: list[SequenceStep], counts: list[int]) -> list[np.ndarray]:
        """lm_head on only the (final-normed) rows that need logits; split back per step."""
        ends = np.cumsum(counts)
        rows = np.concatenate([
            np.arange(end - n, end) if s.all_logits else np.array([end - 1]) for s, n, end in zip(steps, counts, ends)
        ])
        sizes = [n if s.all_logits else 1 for s, n in zip(steps, counts)]
        blas_from = layers.widened_blas_from_rows()
        prompt_from = sum(size for size, n in zip(sizes, counts) if n < blas_from)
        logits = linear(h[rows], self.weights.lm_head, prompt_from)
        return np.split(logits, np.cumsum(sizes)[:-1])
