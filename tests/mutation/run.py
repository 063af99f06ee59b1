"""Planted-bug (mutation) testing: would the suite notice a small plausible bug here?

Each mutant is a (file, old text, new text) edit. The runner copies the repository (tracked and untracked, not
ignored files) to a temporary folder once, then for each mutant applies its edit there, runs the tests that guard
that file (`python -m pytest -x`, the default selection of those modules), and restores the file. A mutant the tests
fail on is killed; one they pass survives. An edit whose `old` text is not in the file exactly once fails loudly, so
the list is kept in step with the code. Mutants shown equivalent (same behaviour, or only speed or memory) are listed
in EQUIVALENT with the reason, and reported apart from the score.

    python tests/mutation/run.py                 # every mutant (~30 min on 2 cores)
    python tests/mutation/run.py --module sampling --module stopping
    python tests/mutation/run.py --list          # the mutants, without running anything
    python tests/mutation/run.py --only P08      # one mutant by id

Not collected by pytest (no test_ prefix). Real test data: $TINYLLAMA_SHARED_MODELS, else ../shared/models beside
this repository, as for the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    what: str
    alt: tuple = ()  # other (old, new) pairs for the same bug in another version of the code (tried in order)

    def edits(self) -> list[tuple[str, str]]:
        return [(self.old, self.new), *self.alt]


# The tests that guard each file, fastest and sharpest first (-x stops at the first failure).
TESTS = {
    "engine/runtime/layers.py": ["tests/test_layers.py", "tests/test_native.py", "tests/test_forward_reference.py"],
    "engine/runtime/rope.py": ["tests/test_forward_reference.py"],
    "engine/runtime/numpy_backend.py": ["tests/test_fused_layers.py", "tests/test_forward_reference.py",
                                        "tests/test_scheduler.py"],
    "engine/runtime/native/api.c": ["tests/test_fused_layers.py", "tests/test_forward_reference.py"],
    "engine/runtime/kv_cache.py": ["tests/test_kv_cache.py", "tests/test_forward_reference.py",
                                   "tests/test_scheduler.py", "tests/test_generate.py", "tests/test_chat.py"],
    "engine/generation/sampling.py": ["tests/test_sampling.py", "tests/test_sampling_generation.py"],
    "engine/generation/state.py": ["tests/test_sampling_generation.py", "tests/test_generate.py"],
    "engine/text/stopping.py": ["tests/test_stopping.py", "tests/test_generate.py"],
    "engine/runtime/native/matmul.h": ["tests/test_native.py", "tests/test_weights_16bit.py",
                                       "tests/test_forward_reference.py"],
    "engine/runtime/native/attention.h": ["tests/test_native.py", "tests/test_forward_reference.py",
                                          "tests/test_inspect_trace.py", "tests/test_scheduler.py"],
    "engine/runtime/native/simd_avx512.h": ["tests/test_native.py", "tests/test_forward_reference.py"],
    "engine/generation/scheduler.py": ["tests/test_scheduler.py", "tests/test_generate.py",
                                       "tests/test_sampling_generation.py", "tests/test_chat.py",
                                       "tests/test_readme_claims.py::"
                                       "test_scheduler_requests_with_their_own_sampling_equal_each_alone",
                                       "tests/test_prefix_cache.py"],
    "engine/generation/serving.py": ["tests/test_serving.py"],
    "engine/serve/inspect_routes.py": ["tests/test_inspect_endpoints.py"],
    "engine/serve/page.py": ["tests/test_inspect_endpoints.py", "tests/test_web_page.py"],
    "engine/serve/static/app.js": ["tests/test_web_page.py"],
    "engine/serve/static/draw.js": ["tests/test_web_page.py"],
    "engine/serve/static/tokens.js": ["tests/test_web_page.py"],
    "engine/runtime/prefix_cache.py": ["tests/test_prefix_cache.py"],
    "engine/generation/draft_payoff.py": ["tests/test_speculation.py", "tests/test_scheduler.py"],
}
MODULES = {"layers": "engine/runtime/layers.py", "rope": "engine/runtime/rope.py",
           "numpy_backend": "engine/runtime/numpy_backend.py", "kv_cache": "engine/runtime/kv_cache.py",
           "sampling": "engine/generation/sampling.py", "state": "engine/generation/state.py",
           "stopping": "engine/text/stopping.py", "scheduler": "engine/generation/scheduler.py",
           "matmul_c": "engine/runtime/native/matmul.h", "attention_c": "engine/runtime/native/attention.h",
           "simd_c": "engine/runtime/native/simd_avx512.h", "api_c": "engine/runtime/native/api.c",
           "serving": "engine/generation/serving.py", "inspect_routes": "engine/serve/inspect_routes.py",
           "page": "engine/serve/page.py", "app_js": "engine/serve/static/app.js",
           "draw_js": "engine/serve/static/draw.js", "tokens_js": "engine/serve/static/tokens.js",
           "prefix_cache": "engine/runtime/prefix_cache.py", "draft_payoff": "engine/generation/draft_payoff.py"}

L, R, N, K = MODULES["layers"], MODULES["rope"], MODULES["numpy_backend"], MODULES["kv_cache"]
P, G, S, C = MODULES["sampling"], MODULES["state"], MODULES["stopping"], MODULES["scheduler"]
XM, XA, XV, XL = MODULES["matmul_c"], MODULES["attention_c"], MODULES["simd_c"], MODULES["api_c"]
WS, WI, WP = MODULES["serving"], MODULES["inspect_routes"], MODULES["page"]
WA, WD, WT = MODULES["app_js"], MODULES["draw_js"], MODULES["tokens_js"]
PC, DP = MODULES["prefix_cache"], MODULES["draft_payoff"]

MUTANTS = [
    # ---- the model math ----
    Mutant("L01", L, "np.sqrt(variance + np.float32(eps))", "(np.sqrt(variance) + np.float32(eps))",
           "RMSNorm: eps outside the square root"),
    Mutant("L02", L, "np.mean(np.square(x), axis=-1, keepdims=True)", "np.mean(np.square(x), axis=0, keepdims=True)",
           "RMSNorm: mean over the rows instead of the features"),
    Mutant("L03", L, "return weight * (x * (", "return (x * (", "RMSNorm: weight left out"),
    Mutant("L04", L, "out[..., :half] = x1 * c - x2 * s", "out[..., :half] = x1 * c + x2 * s", "rotary: sign"),
    Mutant("L05", L, "out[..., half:] = x2 * c + x1 * s", "out[..., half:] = x2 * c - x1 * s", "rotary: sign"),
    Mutant("L06", L, "c, s = cos[:, None, :half], sin[:, None, :half]",
           "c, s = cos[:, None, half:], sin[:, None, half:]",
           "rotary: the tables' second half"),
    Mutant("L07", L, "scores = scores - np.max(scores, axis=-1, keepdims=True)", "scores = scores + 0",
           "softmax: no max subtraction (overflows on large scores)"),
    Mutant("L08", L, "scale = np.float32(1.0 / np.sqrt(head_dim))", "scale = np.float32(1.0 / head_dim)",
           "attention: 1/d instead of 1/sqrt(d)"),
    Mutant("L09", L, "np.arange(length)[None, :] > (start_pos", "np.arange(length)[None, :] >= (start_pos",
           "attention: a query cannot see its own position"),
    Mutant("L10", L, "> (start_pos + np.arange(t))[:, None]", "> (np.arange(t))[:, None]",
           "attention: the causal mask ignores the cached prefix"),
    Mutant("L11", L, "    if t > 1:\n        # Query i", "    if t > 2:\n        # Query i",
           "attention: no causal mask for two-token steps"),
    Mutant("L12", L, "out.reshape(n_kv, group, t, head_dim).transpose(2, 0, 1, 3)",
           "out.reshape(n_kv, group, t, head_dim).transpose(2, 1, 0, 3)", "attention: heads out of order"),
    Mutant("L13", L, "x / (np.float32(1.0) + np.exp(-x))", "x / (np.float32(1.0) + np.exp(x))", "SiLU: sign"),
    Mutant("L14", L, "return silu(gate_up[:, :inter]) * gate_up[:, inter:]",
           "return gate_up[:, :inter] * silu(gate_up[:, inter:])", "SwiGLU: gate and up swapped"),
    Mutant("L15", L, 'BLAS_FROM_ROWS = {"avx512": None, "avx2": 65,', 'BLAS_FROM_ROWS = {"avx512": 65, "avx2": 65,',
           "linear: avx512 hands float32 prompts of 65+ rows to OpenBLAS"),
    Mutant("L16", L, "block = w[start : start + rows]\n        for i in range(m):",
           "block = w[start : start + rows - 1]\n        for i in range(m):",
           "linear (no compiled kernel): a weight row missed per block"),
    Mutant("R01", R, "np.arange(0, dim, 2, dtype=np.int64)", "np.arange(1, dim, 2, dtype=np.int64)",
           "rope: odd exponents"),
    Mutant("R02", R, "inv_freq = (np.float32(1.0) / np.power(", "inv_freq = (np.float32(1.0) * np.power(",
           "rope: theta^x instead of theta^-x"),
    Mutant("R03", R, "return (inv_freq / factor).astype(np.float32)", "return (inv_freq * factor).astype(np.float32)",
           "rope linear scaling: multiplied"),
    Mutant("R04", R, "np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)",
           "np.where(wavelen < low_freq_wavelen, inv_freq / factor, inv_freq)", "rope llama3: wrong band scaled"),
    Mutant("R05", R, "((old_context / wavelen - low) / (high - low))",
           "((old_context / wavelen - high) / (high - low))",
           "rope llama3: smoothing offset"),
    Mutant("R06", R, "smoothed = (1 - smooth) * scaled / factor + smooth * scaled",
           "smoothed = smooth * scaled / factor + (1 - smooth) * scaled", "rope llama3: blend reversed"),
    Mutant("R07", R, "medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)",
           "medium = ~(wavelen < high_freq_wavelen)", "rope llama3: the medium band unbounded"),
    Mutant("R08", R, "emb = np.concatenate([freqs, freqs], axis=-1)", "emb = np.repeat(freqs, 2, axis=-1)",
           "rope: interleaved (GPT-J) layout instead of rotate_half"),
    Mutant("R09", R, "positions = np.arange(config.max_position_embeddings, dtype=np.float32)",
           "positions = np.arange(1, config.max_position_embeddings + 1, dtype=np.float32)", "rope: positions from 1"),
    Mutant("N01", N, "h = rms_norm(x, w.layers[0].attn_norm, self.eps)",
           "h = rms_norm(x, w.layers[0].mlp_norm, self.eps)",
           "forward: the MLP norm's weight before the first attention"),
    Mutant("N02", N, "x, h = add_rms_norm(x, linear(attn, layer.wo", "x, h = add_rms_norm(0 * x, linear(attn, layer.wo",
           "forward: no residual around attention"),
    Mutant("N03", N, "np.concatenate([np.arange(start, start + n) for", "np.concatenate([np.arange(0, n) for",
           "forward: positions restart at 0 for every step"),
    Mutant("N04", N, "s.cache.length = start + n", "s.cache.length = start + n - 1",
           "forward: the cache forgets the last token"),
    Mutant("N05", N, "np.arange(end - n, end) if s.all_logits else np.array([end - 1])",
           "np.arange(end - n, end) if s.all_logits else np.array([end - n])",
           "forward: the first token's logits instead of the last"),
    Mutant("N06", N, "if i + 1 < len(w.layers) else w.final_norm", "if i + 1 < len(w.layers) else layer.mlp_norm",
           "forward: the last layer's MLP norm weight instead of the final norm's"),
    Mutant("N07", N, "self.cos, self.sin, c.num_attention_heads + c.num_key_value_heads,",
           "self.cos, self.sin, c.num_attention_heads,", "forward: keys not rotated (only the query heads)"),
    Mutant("N08", N, "layer.wo, prompt_from), layer.mlp_norm, self.eps)",
           "layer.wo, prompt_from), layer.attn_norm, self.eps)",
           "forward: the attention norm's weight before the MLP"),
    Mutant("N09", N, "s.cache.reserve(start + n)", "s.cache.reserve(start + n - 1)",
           "forward: one position too few reserved",
           alt=(("s.cache.reserve(s.cache.length + len(s.token_ids))",
                 "s.cache.reserve(s.cache.length + len(s.token_ids) - 1)"),)),
    # ---- the KV cache ----
    Mutant("K01", K, "grown = max(new_length, self.capacity + self.capacity // 2)", "grown = new_length",
           "cache: grows by exactly what is asked (a copy per block)"),
    Mutant("K02", K, "capacity = min(self.max_length, blocks * self.block_tokens)",
           "capacity = blocks * self.block_tokens", "cache: capacity past the window"),
    Mutant("K03", K, "new[:, :, : self.length] = old[:, :, : self.length]",
           "new[:, :, : self.length - 1] = old[:, :, : self.length - 1]", "cache: growing loses the last token"),
    Mutant("K04", K, "if new_length <= self.capacity:\n            return",
           "if new_length < self.capacity:\n            return",
           "cache: reallocates when exactly full"),
    Mutant("K05", K, "if new_length > self.max_length:", "if new_length >= self.max_length:",
           "cache: the last position of the window refused"),
    Mutant("K06", K, "if not 0 <= n <= self.length:", "if not 0 <= n <= self.capacity:",
           "cache: truncate may 'grow' into unwritten positions"),
    Mutant("K07", K, "self.k[layer, :, start:end] = k.swapaxes(0, 1)", "self.k[layer, :, start:end] = v.swapaxes(0, 1)",
           "cache: values stored as keys"),
    Mutant("K08", K, "return self.k[layer, :, :length], self.v[layer, :, :length]",
           "return self.k[layer, :, :length], self.v[layer, :, : length - 1]", "cache: a value short"),
    Mutant("K09", K, "return 2 * self.k.size * self.k.itemsize", "return self.k.size * self.k.itemsize",
           "cache: nbytes counts keys only"),
    Mutant("K10", K, "blocks = -(-grown // self.block_tokens)", "blocks = grown // self.block_tokens",
           "cache: capacity rounded down"),
    # ---- the sampler (and the context it is given) ----
    Mutant("P01", P, "np.where(seen < 0, seen * factor, seen / factor)",
           "np.where(seen <= 0, seen * factor, seen / factor)",
           "repetition penalty: zero logits multiplied"),
    Mutant("P02", P, "np.where(seen < 0, seen * factor, seen / factor)",
           "np.where(seen < 0, seen / factor, seen * factor)",
           "repetition penalty: inverted"),
    Mutant("P03", P, "ids = np.unique(ids[(ids >= 0) & (ids < row.shape[0])])",
           "ids = ids[(ids >= 0) & (ids < row.shape[0])]",
           "repetition penalty: repeated ids not merged"),
    Mutant("P04", P, "ids = np.unique(ids[(ids >= 0) & (ids < row.shape[0])])", "ids = np.unique(ids[(ids >= 0)])",
           "repetition penalty: ids outside the vocabulary not ignored"),
    Mutant("P05", P, "return _as_logits(logits) / np.float32(temperature)",
           "return _as_logits(logits) * np.float32(temperature)",
           "temperature multiplies"),
    Mutant("P06", P, "np.where(row < kth_largest, _REMOVED, row)", "np.where(row <= kth_largest, _REMOVED, row)",
           "top-k: the k-th token removed"),
    Mutant("P07", P, "remove_sorted = cumulative <= np.float32(1 - float(top_p))",
           "remove_sorted = cumulative < np.float32(1 - float(top_p))",
           "top-p: keeps the token at an exact tie"),
    Mutant("P08", P, "    remove_sorted[-1] = False  # min_tokens_to_keep = 1\n", "",
           "top-p: may remove every token"),
    Mutant("P09", P, "order = np.lexsort((-np.arange(row.shape[0]), row))",
           "order = np.lexsort((np.arange(row.shape[0]), row))",
           "top-p: ties keep the highest ids"),
    Mutant("P10", P, "remove = probs < np.float32(min_p) * probs.max()",
           "remove = probs <= np.float32(min_p) * probs.max()",
           "min-p: removes the token at an exact tie"),
    Mutant("P11", P, "    remove[np.argmax(probs)] = False\n", "", "min-p: the top token not protected"),
    Mutant("P12", P, "    if params.top_k != 0:\n        row = apply_top_k(row, params.top_k)\n"
                     "    if params.top_p < 1.0:\n"
                     "        row = apply_top_p(row, params.top_p)\n",
           "    if params.top_p < 1.0:\n        row = apply_top_p(row, params.top_p)\n    if params.top_k != 0:\n"
           "        row = apply_top_k(row, params.top_k)\n", "processors: top-p before top-k"),
    Mutant("P13", P, "    if params.temperature != 1.0:\n", "    if params.temperature > 1.0:\n",
           "temperature below 1 ignored"),
    Mutant("P14", P, "return int(np.argmax(apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)))",
           "return int(np.argmax(logits))", "greedy ignores the repetition penalty",
           alt=(("return int(np.argmax(_penalized(logits, params, previous_ids, generated_ids)))",
                 "return int(np.argmax(logits))"),)),
    Mutant("P15", P, "return int(rng.choice(probs.shape[0], p=probs))", "return int(np.argmax(probs))",
           "sampling picks the most likely token"),
    Mutant("P16", P, "if not 0 < self.top_p <= 1:", "if not 0 <= self.top_p <= 1:", "validation: top_p = 0 accepted"),
    Mutant("P17", P, "processed = process_logits(logits, params, previous_ids).astype(np.float64)",
           "processed = process_logits(logits, params, previous_ids)", "probabilities in float32",
           alt=(("processed = process_logits(logits, params, previous_ids, generated_ids).astype(np.float64)",
                 "processed = process_logits(logits, params, previous_ids, generated_ids)"),)),
    Mutant("P18", P, "    if params.min_p > 0.0:\n        row = apply_min_p(row, params.min_p)\n", "",
           "min-p never applied"),
    Mutant("G01", G, "self.rng, self.prompt_ids + self.generated", "self.rng, self.generated",
           "the sampler sees only the generated ids (penalty ignores the prompt)"),
    # ---- stop strings ----
    Mutant("S01", S, "self.stop_strings = [s for s in stop_strings if s]", "self.stop_strings = list(stop_strings)",
           "an empty stop string kept (stops at once)"),
    Mutant("S02", S, "out, self.pending = self.pending[: min(hits)], \"\"",
           "out, self.pending = self.pending[: max(hits)], \"\"",
           "the later of two stop strings wins"),
    Mutant("S03", S, "keep = self._held_suffix_length()", "keep = 0", "nothing held back: stop-string starts emitted"),
    Mutant("S04", S, "for k in range(min(len(s) - 1, len(self.pending)), best, -1):",
           "for k in range(min(len(s), len(self.pending)), best, -1):", "held suffix may be a whole stop string"),
    Mutant("S05", S, "if self.pending.endswith(s[:k]):", "if self.pending.startswith(s[:k]):",
           "held text: a prefix instead of a suffix"),
    Mutant("S06", S, "out, self.pending = self.pending, \"\"", "out, self.pending = \"\", \"\"",
           "flush drops the held text"),
    Mutant("S07", S, "        if not self.stop_strings:\n            return piece, False\n", "",
           "no shortcut without stop strings"),
    Mutant("S08", S, "                    best = k\n                    break\n", "                    best = k\n",
           "held suffix: the shortest match instead of the longest"),
    # ---- the compiled kernels (C): the model math as it runs by default ----
    Mutant("X01", XM, "dst[c + l] = src[c + 2 * l];", "dst[c + l] = src[c + 2 * l + 1];",
           "matmul: bf16 packing puts odd columns in the even lanes"),
    Mutant("X02", XM, "memcpy(pad[j], w + j * ldw_bytes + k * ELEM(wt), (size_t)(K - k) * ELEM(wt));",
           "memcpy(pad[j], w + j * ldw_bytes + k * ELEM(wt), (size_t)(K - k - 1) * ELEM(wt));",
           "matmul: the last partial chunk drops a weight column"),
    Mutant("X03", XM, "dst[full + (r % 2) * VL + r / 2] = src[k];", "dst[full + r] = src[k];",
           "matmul: the tail of x not reordered even/odd for bf16"),
    Mutant("X04", XM, "tile_any(xp + i * ldxp, ldxp, w + j * ldw * ELEM(wt), ldw",
           "tile_any(xp + i * ldxp, ldxp, w + j * ldw, ldw", "matmul: edge rows stepped in elements, not bytes"),
    Mutant("X05", XM, "uint32_t bits = (uint32_t)src[k] << 16;", "uint32_t bits = (uint32_t)src[k] << 15;",
           "widen: bf16 bits shifted one place short"),
    Mutant("X06", XM, "vf e = vf_exp(vf_mul(x, vf_set1(-1.0f)));", "vf e = vf_exp(x);", "SwiGLU: sigmoid's sign"),
    Mutant("X07", XM, "o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];", "o[i] = g[i] * u[i];",
           "SwiGLU: the tail columns without the sigmoid"),
    Mutant("X08", XM, "const float inv = 1.0f / sqrtf((vf_sum(acc) + tail) / (float)H + j->eps);",
           "const float inv = 1.0f / (sqrtf((vf_sum(acc) + tail) / (float)H) + j->eps);",
           "RMSNorm: eps outside the square root"),
    Mutant("X09", XM, "tail += v[i] * v[i];", "tail += v[i];", "RMSNorm: the tail columns not squared"),
    Mutant("X10", XM, "vf xv = r ? vf_add(vf_load(x + i), vf_load(r + i)) : vf_load(x + i);",
           "vf xv = vf_load(x + i);", "RMSNorm: the residual not added"),
    Mutant("X11", XM, "vf_store(x1 + i, vf_sub(vf_mul(a, cv), vf_mul(bb, sv)));",
           "vf_store(x1 + i, vf_add(vf_mul(a, cv), vf_mul(bb, sv)));", "rotary: sign"),
    Mutant("X12", XM, "const float *c = j->cos + j->pos[m] * j->head_dim, *s = j->sin + j->pos[m] * j->head_dim;",
           "const float *c = j->cos + m * j->head_dim, *s = j->sin + m * j->head_dim;",
           "rotary: row index instead of position"),
    Mutant("X13", XM, "x2[i] = bb * c[i] + a * s[i];", "x2[i] = bb * c[i] - a * s[i];",
           "rotary: sign in the tail of a half head"),
    Mutant("X14", XA, "s[r][j] = j0 + j <= pos[r] ? sum * a->scale : -INFINITY;",
           "s[r][j] = j0 + j < pos[r] ? sum * a->scale : -INFINITY;", "attention: a query cannot see itself"),
    Mutant("X15", XA, "if (alpha != 1.0f) {", "if (0) {", "attention: the running output not rescaled"),
    Mutant("X16", XA, "l[r] = sf_fmadd(l[r], alpha, vf_sum(total));", "l[r] = l[r] + vf_sum(total);",
           "attention: the running sum not rescaled"),
    Mutant("X17", XA, "head[rb] = kv * group + g;", "head[rb] = g * a->n_kv + kv;",
           "attention: query heads grouped by stride, not in blocks (GQA order)"),
    Mutant("X18", XA, "for (ptrdiff_t d = Dv; d < D; d++) sum = sf_fmadd(q[r][d], kr[d], sum);", "",
           "attention: the tail of head_dim left out of the scores"),
    Mutant("X19", XA, "row[j0 + j] = buf[j] * inv;", "row[j0 + j] = buf[j];",
           "attention probabilities (trace): not normalised"),
    Mutant("X20", XA, "buf[j] = sum * a->scale;", "buf[j] = sum;", "attention probabilities (trace): unscaled"),
    Mutant("X21", XA, "memcpy(v + h * ldh + (start[s] + t) * D, src + t * ld_qkv + q_size + kv_size + h * D,",
           "memcpy(v + h * ldh + (start[s] + t) * D, src + t * ld_qkv + q_size + h * D,",
           "step attention: the keys stored as values"),
    Mutant("X22", XA, "float *k = k_cache[s] + layer * n_kv_heads * ldh, *v = v_cache[s] + layer * n_kv_heads * ldh;",
           "float *k = k_cache[s] + layer * ldh, *v = v_cache[s] + layer * ldh;",
           "step attention: a layer's cache at the wrong offset"),
    Mutant("X23", XA, "if (a->first_item[mid] <= i) lo = mid;", "if (a->first_item[mid] < i) lo = mid;",
           "step attention: an item given to the previous sequence"),
    Mutant("X24", XV, "_mm512_slli_epi32(_mm512_loadu_si512((const void *)p), 16)",
           "_mm512_srli_epi32(_mm512_loadu_si512((const void *)p), 16)", "avx512: bf16 even lanes shifted right"),
    Mutant("X25", XV, "p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));",
           "p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0001e-1f));", "avx512 exp: a polynomial coefficient off"),
    # ---- the decoder layers in one call (api.c) ----
    Mutant("X26", XL, "rms_norms[isa](x, H, proj, H, l->next_norm, c->eps, x, h, H, N, H, threads);",
           "rms_norms[isa](x, H, proj, H, l->mlp_norm, c->eps, x, h, H, N, H, threads);",
           "one-call layers: the MLP norm's weight where the next layer's input norm belongs"),
    Mutant("X27", XL, "rotaries[isa](qkv, W, pos, c->cos, c->sin, N, c->n_heads + c->n_kv_heads, D, threads);",
           "rotaries[isa](qkv, W, pos, c->cos, c->sin, N, c->n_heads, D, threads);",
           "one-call layers: keys not rotated"),
    Mutant("X28", XL, "rms_norms[isa](x, H, proj, H, l->mlp_norm, c->eps, x, h, H, N, H, threads);",
           "rms_norms[isa](x, H, proj, H, l->mlp_norm, c->eps, NULL, h, H, N, H, threads);",
           "one-call layers: the residual stream not updated after attention"),
    Mutant("X29", XL, "float *qkv = scratch, *attn = qkv + N * W,", "float *qkv = scratch, *attn = qkv + W,",
           "one-call layers: scratch buffers overlap at more than one row"),
    # ---- the scheduler ----
    Mutant("C01", C, "budget = self.prefill_budget() if decoding else None", "budget = self.prefill_budget()",
           "a lone prompt prefilled in chunks too"),
    Mutant("C02", C, "elif budget is None or budget > 0:", "elif budget is None or budget >= 0:",
           "a prefilling request given an empty chunk"),
    Mutant("C03", C, "while self.waiting and self.occupied + self.waiting[0].slots <= self.max_active:",
           "while self.waiting and self.occupied + self.waiting[0].slots <= self.max_active + 1:",
           "one request more than max_active"),
    # C04/C05 planted bugs in the step-by-step draft length (grow by 2, shrink by 1, never below 1), which the
    # draft payoff estimate (engine/generation/draft_payoff.py) replaced: the same bugs in the length it picks.
    Mutant("C04", DP, "n = min(self.speculate, room)\n", "n = min(self.speculate - 1, room)\n",
           "draft length: one short of the most --speculate allows (the longest draft never asked)"),
    Mutant("C05", DP, "        self.probe_after = min(2 * self.probe_after, self.LAST_PROBE)\n        return True\n",
           "        self.probe_after = min(2 * self.probe_after, self.LAST_PROBE)\n        return False\n",
           "draft length falls to 0 for good (speculation stops: once plain decoding wins, no probe is ever due)"),
    Mutant("C06", C, "if r.state.finished or i >= len(draft) or event.token_id != draft[i]:",
           "if r.state.finished or i >= len(draft):", "every draft token accepted"),
    Mutant("C07", C, "r.cache.truncate(fed_before + i + 1)", "r.cache.truncate(fed_before + i)",
           "the cache drops an accepted token"),
    Mutant("C08", C, "room = min(r.state.max_length - r.cache.length - 1, remaining - 1)",
           "room = min(r.state.max_length - r.cache.length, remaining - 1)",
           "drafts may run past the window"),
    Mutant("C09", C, "        if not request.keep_cache:\n            request.cache = None\n",
           "        if False:\n            pass\n",
           "a finished request keeps its cache"),
    Mutant("C10", C, "            r.accepted_draft_tokens += 1\n", "", "accepted drafts not counted"),
    Mutant("C11", C, "                while request.events:\n", "                if request.events:\n",
           "run() yields one event per request per step"),
    Mutant("C12", C, "decode_seconds=max(0.0, self.t_last - self.t_first)",
           "decode_seconds=max(0.0, self.t_last - self.t_start)",
           "decode time includes the prefill"),
    Mutant("C13", C, "if r.prefilled < len(r.prompt_ids):\n                        continue",
           "if r.prefilled < len(r.prompt_ids) - 1:\n                        continue",
           "decoding starts a token early"),
    # ---- the web page and its endpoints ----
    Mutant("W01", WS, 'self._inbox.append(("call", (fn, future)))', "self._run_call(fn, future)",
           "ServingLoop.call runs the work on the caller's thread (racing the scheduler)"),
    Mutant("W02", WI, "return AttentionInspection(model, ids, layer=body.layer, head=body.head,",
           "return AttentionInspection(model, ids, layer=body.layer, head=0,", "/v1/inspect/attention: always head 0"),
    Mutant("W03", WI, "    slots = Slots(max_inspections, state.metrics.inspections_running)\n",
           "    slots = Slots(max_inspections, state.metrics.inspections_running)\n    max_bytes = 2 * max_bytes\n",
           "the trace limit doubled"),
    Mutant("W04", WP, "script-src 'self'; ", "script-src 'self' 'unsafe-inline'; ", "CSP allows inline script"),
    Mutant("W05", WA, "    body.textContent = message.content;", "    body.innerHTML = message.content;",
           "a message inserted as HTML"),
    Mutant("W06", WA, "if (state.busy) state.busy.controller.abort();", "if (state.busy) state.busy.aborted = true;",
           "Stop does not abort the fetch"),
    Mutant("W07", WA, 'if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }',
           'if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); send(); }', "Shift+Enter sends"),
    Mutant("W08", WD, "ctx.fillStyle = k > q ? MASKED", "ctx.fillStyle = k < q ? MASKED",
           "heatmap: the wrong triangle masked"),
    Mutant("W09", WT, "prob.textContent = percent(alt.logprob);", "prob.textContent = percent(entry.logprob);",
           "tooltip: the chosen token's probability on every row"),
    Mutant("C14", C, "                    if self.prefix_cache is not None:\n                        self._store(r, "
           "r.prompt_ids)\n", "", "a prompt's blocks stored only when its request finishes (running ones not shared)"),
    # C15: Scheduler._start_forks copies the leader's cache through KVCache.copy_prefix_from now.
    Mutant("C15", K, "self.v[:, :, :n] = source.v[:, :, :n]", "self.v[:, :, :n] = source.k[:, :, :n]",
           "a fork's values copied from its leader's keys (KVCache.copy_prefix_from)"),
    Mutant("C16", C, "            self._accept(f, logits, [], now)\n", "",
           "a fork never samples its first token from the shared prefill's logits"),
    Mutant("C17", C, "            self._promote(request.followers)\n", "            pass\n",
           "forks of a leader cancelled before its prefill are never run"),
    # ---- the prefix cache ----
    Mutant("PC1", PC, "chain = self._chain(token_ids, len(token_ids) - 1, salt)\n        if not chain:",
           "chain = self._chain(token_ids, len(token_ids), salt)\n        if not chain:",
           "a prompt cached whole is restored whole: no last token left to give logits"),
    Mutant("PC2", PC, "block = self._index.get((self._root(salt) if parent is None else parent.id,",
           "block = self._index.get((self._root(salt),",
           "a lookup ignores the blocks before a block (found by its own tokens alone)"),
    Mutant("PC3", PC, "for block in reversed(chain):", "for block in chain:",
           "a chain touched root first: shared prefixes evicted before the leaves that extend them"),
    Mutant("PC4", PC, "data[1] = cache.v[:, :, start:start + b]", "data[1] = cache.k[:, :, start:start + b]",
           "a block's values stored from the keys"),
    Mutant("PC5", PC, "victim = next((b for b in segment.values() if b.id not in keep), None)",
           "victim = next((b for b in segment.values()), None)",
           "storing a sequence may evict its own prefix"),
    Mutant("PC6", PC, "            for child_id in b.children:\n"
           "                stack.append(self._protected.get(child_id) or self._probation[child_id])\n", "",
           "an evicted block's continuations stay (unreachable, holding memory)"),
]

EQUIVALENT = {  # mutant id -> why no test can tell it from the original (documented behaviour unchanged)
    "L06": "cos/sin tables repeat their first half in the second (rope_tables concatenates freqs twice), so either "
           "half gives the same values",
    "L15": "which of the compiled kernel and OpenBLAS multiplies a prompt is a speed choice: they agree to fp32 "
           "rounding, within every test's tolerance",
    "R09": "rotary embeddings are relative: shifting every position by one rotates queries and keys alike, so "
           "q.k (and every logit) is unchanged up to float rounding of the tables",
    "P01": "a zero logit times or divided by the penalty is zero either way",
    "P03": "the penalised values are computed from the original row, so a repeated id writes the same value twice",
    "P11": "min_p <= 1 (validated), so the top token's probability is never below min_p times itself: the line only "
           "restates what the comparison already guarantees",
    "S04": "a suffix of `pending` equal to a whole stop string would have been found by find() just before, so the "
           "longer range never matches",
    "S07": "with no stop strings the general path finds no hit and holds back nothing: the same output",
}


def copy_repo(dest: Path) -> None:
    """Tracked and untracked, not ignored, files of the repository into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def apply(root: Path, m: Mutant) -> str:
    """Apply mutant m in the copy at root; returns the original text (to restore). Fails loudly on a stale edit."""
    path = root / m.file
    text = path.read_text()
    for old, new in m.edits():
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return text
    counts = ", ".join(f"{text.count(old)} times" for old, _ in m.edits())
    raise SystemExit(f"{m.id}: the text to replace occurs {counts} in {m.file} (expected once): update the mutant "
                     f"list\n  {m.old!r}")


def run_tests(root: Path, tests: list[str], env: dict, timeout: int) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'timeout', seconds, last lines of output) for the tests in the copy at root."""
    t0 = time.monotonic()
    tests = [t for t in tests if (root / t.split("::")[0]).exists()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - t0, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", choices=sorted(MODULES), help="only this module's mutants (repeat)")
    p.add_argument("--only", action="append", help="only this mutant id (repeat)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=600, help="seconds per mutant's test run (default 600)")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if (not args.module or m.file in {MODULES[x] for x in args.module})
              and (not args.only or m.id in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.file:34s} {m.what}" + ("  [equivalent]" if m.id in EQUIVALENT else ""))
        return 0
    env = dict(os.environ, TINYLLAMA_SHARED_MODELS=os.environ.get(
        "TINYLLAMA_SHARED_MODELS", str(REPO.parent / "shared" / "models")), PYTHONDONTWRITEBYTECODE="1")
    results = []
    with tempfile.TemporaryDirectory(prefix="tinyllama-mutants-") as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        env["TINYLLAMA_CACHE"] = str(Path(tmp) / "kernels")  # each C mutant builds its own library, not in ~/.cache
        copy_repo(root)
        for m in chosen:  # every edit applies before anything runs: a stale list fails at once
            (root / m.file).write_text(apply(root, m))
        for f in dict.fromkeys(m.file for m in chosen):  # the unmutated code must pass the same tests
            outcome, seconds, tail = run_tests(root, TESTS[f], env, args.timeout)
            if outcome != "survived":
                raise SystemExit(f"the tests of {f} fail without any mutant ({outcome}):\n{tail}")
            print(f"baseline {f}: passes ({seconds:.0f} s)", flush=True)
        for m in chosen:
            original = apply(root, m)
            try:
                outcome, seconds, tail = run_tests(root, TESTS[m.file], env, args.timeout)
            finally:
                (root / m.file).write_text(original)
            mark = {"killed": "killed  ", "timeout": "timeout ", "survived": "SURVIVED"}[outcome]
            note = "  (equivalent: " + EQUIVALENT[m.id] + ")" if m.id in EQUIVALENT else ""
            print(f"{m.id} {mark} {seconds:5.0f} s  {m.file}: {m.what}{note}", flush=True)
            results.append(dict(id=m.id, file=m.file, what=m.what, outcome=outcome, seconds=round(seconds, 1),
                                equivalent=m.id in EQUIVALENT, tail=tail))
    print("\nscore (killed / mutants that are not equivalent), per file:")
    for f in dict.fromkeys(r["file"] for r in results):
        mine = [r for r in results if r["file"] == f]
        real = [r for r in mine if not r["equivalent"]]
        killed = sum(r["outcome"] != "survived" for r in real)
        equivalent = len(mine) - len(real)
        print(f"  {f:34s} {killed}/{len(real)}" + (f"  (+{equivalent} equivalent)" if equivalent else ""))
    survivors = [r for r in results if r["outcome"] == "survived" and not r["equivalent"]]
    for r in survivors:
        print(f"  survived: {r['id']} {r['file']}: {r['what']}")
    wrongly_equivalent = [r for r in results if r["equivalent"] and r["outcome"] != "survived"]
    for r in wrongly_equivalent:
        print(f"  listed as equivalent but killed: {r['id']} (remove it from EQUIVALENT)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if survivors or wrongly_equivalent else 0


if __name__ == "__main__":
    sys.exit(main())
