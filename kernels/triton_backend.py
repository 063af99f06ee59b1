"""TritonBackend: the engine's backend interface (new_cache / forward) with every op a Triton kernel.

On a CUDA machine the kernels run on the GPU. Without CUDA they run in Triton's CPU interpreter on CPU
tensors (slow; for tests): TRITON_INTERPRET=1 is then set here unless the environment already chose, and
it must be in place before triton first compiles a kernel module (i.e. before any `kernels.*` kernel import).
torch only holds the arrays (allocation, host<->device copies, gathers, CUDA-graph capture); the arithmetic is
the kernels'.

Two ways through `forward`:
  * the static decode path, for the common step of B sequences with one new token each (and pooled caches): every
    input lives in preallocated device buffers (token ids, positions, lengths, cache slots), the caches are slots of
    one KVSlotPool whose per-layer storage never moves, and decode attention has a grid fixed by the batch bucket and
    the pool window (lengths are read on the device). The batch is padded to a bucket (1, 2, 4, ... 32; larger
    batches run as several buckets) whose padding rows write into the pool's scratch slot. On a CUDA device with
    `cuda_graphs` on, each bucket's step is captured once (lazily, on first use) into a CUDA graph and replayed
    after copying the inputs into the static buffers: one graph launch instead of ~10 kernel launches per layer.
    Without CUDA (the interpreter) the same code runs uncaptured, which is how it is tested.
  * the eager path for everything else (prefill, ragged and mixed batches, all-logits verification): still one
    K/V scatter and one decode-attention launch per layer for all pooled one-token sequences, a prefill-attention
    launch per multi-token sequence.
"""

import os
import warnings

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ruff: noqa: E402
from engine.runtime.batch import SequenceStep
from engine.config import ModelConfig
from engine.runtime.weights import ModelWeights
from engine.runtime.rope import rope_tables
from tinyllama_kernels._common import interpreting
from tinyllama_kernels.attention_decode import decode_attention
from tinyllama_kernels.attention_prefill import prefill_attention
from tinyllama_kernels.device_cache import DeviceKVCache, KVSlotPool, PooledKVCache
from tinyllama_kernels.kv_store import store_kv
from tinyllama_kernels.launch import Target, target_of
from tinyllama_kernels.matmul import matmul
from tinyllama_kernels.norm import rms_norm
from tinyllama_kernels.rotary import apply_rotary_qkv
from tinyllama_kernels.swiglu import swiglu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device() -> torch.device:
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if not interpreting():
        raise RuntimeError("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU")
    return torch.device("cpu")


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A weight array as a CPU tensor over the same memory (no copy), in the dtype it holds: NumPy uint16 holds
    bfloat16 bits (the loader's representation of a bf16 checkpoint), float16 and float32 are themselves."""
    a = np.ascontiguousarray(a)  # the loader's arrays already are: no copy
    if a.dtype not in (np.uint16, np.float16, np.float32):
        raise TypeError(f"weights must be uint16 (bfloat16 bits), float16 or float32 arrays, got {a.dtype}")
    with warnings.catch_warnings():  # a read-only array (a memory map) is fine: weights are never written
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if a.dtype == np.uint16 else t


def upload(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A weight array -> contiguous tensor of the same shape on `device` in `dtype`.

    The array crosses to the device in its own dtype and is converted there: a 16-bit matrix is never widened to
    float32 on the host (torch converts a cross-device copy on the source side when the dtypes differ)."""
    return host_tensor(a).to(device=device).to(dtype=dtype)


class _DeviceLayer:
    """One decoder layer's weights on the device, in the compute dtype (HF [out, in] layout, fused)."""

    def __init__(self, layer, to_device):
        self.attn_norm = to_device(layer.attn_norm)
        self.wqkv = to_device(layer.wqkv)
        self.wo = to_device(layer.wo)
        self.mlp_norm = to_device(layer.mlp_norm)
        self.w_gate_up = to_device(layer.w_gate_up)
        self.w_down = to_device(layer.w_down)


GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
POOL_WINDOW_MAX = 4096  # default per-slot window of the static KV pool (longer sequences move to private storage)


class TritonBackend:
    """Runs a Llama model with the Triton kernels; same interface and results as engine.runtime.numpy_backend.NumpyBackend.

    weights: matrices and embedding as float32, float16 or uint16 (bfloat16 bits) arrays; each is copied to the
      device in that dtype and converted to `dtype` there.
    dtype: "float32" | "bfloat16" | "float16" | "auto" (bfloat16 on a GPU, float32 in the interpreter).
    cuda_graphs: keep the caches in a static slot pool and run one-token decode steps through the static-buffer
      path, captured as CUDA graphs on a CUDA device (uncaptured in the interpreter). False: per-sequence growing
      caches and the eager path only.
    graph_batch_sizes: the batch buckets of the static path (one graph each); larger batches run in pieces.
    pool_window: positions per pool slot (default min(model window, 4096)); a longer sequence moves to private
      storage and the eager path. Each slot reserves n_layers * 2 * n_kv_heads * pool_window * head_dim values.
    target: the device facts every kernel launch is planned for (tinyllama_kernels.launch.Target); default: the device's
      own. With device="meta" and a named target (tinyllama_kernels.launch.H100) under tinyllama_kernels.launch.recording(), forward
      records the launches this backend would make on that GPU without running anything (tinyllama_kernels.aot).
    """

    name = "triton"

    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: str = "auto", device=None,
                 cuda_graphs: bool = True, graph_batch_sizes=GRAPH_BATCH_SIZES, pool_window: int | None = None,
                 target: Target | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else _default_device()
        self.target = target if target is not None else target_of(self.device)
        if dtype == "auto":
            dtype = "float32" if self.target.interpret else "bfloat16"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
        self.dtype = DTYPES[dtype]

        def to_device(a: np.ndarray) -> torch.Tensor:
            return upload(a, self.device, self.dtype)

        self.embed = to_device(weights.embed)
        self.lm_head = self.embed if weights.lm_head is weights.embed else to_device(weights.lm_head)
        self.final_norm = to_device(weights.final_norm)
        self.layers = [_DeviceLayer(layer, to_device) for layer in weights.layers]
        cos, sin = rope_tables(config)  # (max_pos, head_dim) float32, kept in fp32
        self.cos = torch.from_numpy(cos).to(self.device)
        self.sin = torch.from_numpy(sin).to(self.device)
        self.eps = float(config.rms_norm_eps)

        self.cuda_graphs = bool(cuda_graphs)
        # Capture only on a real CUDA device; in the interpreter the static path runs as plain calls.
        self.capture = self.cuda_graphs and self.device.type == "cuda" and not interpreting()
        sizes = sorted({int(b) for b in graph_batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"graph_batch_sizes must be positive integers, got {graph_batch_sizes!r}")
        self.graph_batch_sizes = tuple(sizes)
        window = config.max_position_embeddings
        self.pool_window = min(window, POOL_WINDOW_MAX) if pool_window is None else int(pool_window)
        if not 1 <= self.pool_window <= window:
            raise ValueError(f"pool_window must be in 1..{window}, got {pool_window!r}")
        self.pool: KVSlotPool | None = None  # allocated on the first new_cache()
        self._static = None  # _StaticInputs, allocated on the first static step
        self._graphs: dict[int, object] = {}  # bucket -> torch.cuda.CUDAGraph
        self._graphs_generation = -1  # pool.generation the graphs were captured against
        self.stats = {"static_steps": 0, "eager_steps": 0, "graph_captures": 0, "graph_replays": 0}

    # ---- caches ---------------------------------------------------------------------------------------------

    def new_cache(self):
        """An empty device KV cache for one sequence: a pool slot (cuda_graphs) or its own growing tensors."""
        c = self.config
        if not self.cuda_graphs:
            return DeviceKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.max_position_embeddings,
                                 self.dtype, self.device)
        if self.pool is None:
            self.pool = KVSlotPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.pool_window,
                                   self.dtype, self.device, slots=1 + self.graph_batch_sizes[-1] // 4)
        return PooledKVCache(self.pool, c.max_position_embeddings)

    def _pooled(self, cache) -> bool:
        return isinstance(cache, PooledKVCache) and cache.slot is not None and cache.pool is self.pool

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, steps: list[SequenceStep]) -> list[np.ndarray]:
        """Run every step's new tokens through the model, appending their K/V to each step's cache.

        Returns per step logits (n or 1, vocab) as NumPy float32 on the host (rounded to the compute dtype first,
        as the reference model does), copying only the rows asked for.

        Sampling on the GPU (returning token ids instead of logits) was considered and not done: the engine's shared
        sampling code (temperature/top-k/top-p/min-p, repetition penalty, seeded RNG equal to transformers'), stop
        logic and speculative verification all consume float32 logits on the host, and a device copy of it would
        need its own tests of equality. The copy back is one bf16 row of 32000 logits (64 KB, widened to float32 on the
        host) per sequence, ~10 us over PCIe, small against a decode step; worth revisiting if gpu_check shows the
        host round trip mattering at batch 1.
        """
        starts = [s.cache.length for s in steps]
        counts = [len(s.token_ids) for s in steps]
        for s, start, n in zip(steps, starts, counts):
            s.cache.reserve(start + n)  # raises before any cache is touched if a sequence would overflow
        if self.cuda_graphs and all(n == 1 for n in counts) and all(self._pooled(s.cache) for s in steps):
            return self._forward_static(steps, starts)
        return self._forward_eager(steps, starts, counts)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder stack on the residual stream x (N, hidden); returns the final-normed hidden states.

        attend(i, q, k, v, out): store layer i's new K/V and write attention into out (N, n_heads, head_dim).
        """
        c = self.config
        n_tok = x.shape[0]
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_end, k_end = c.q_size, c.q_size + c.kv_size
        h = rms_norm(x, self.layers[0].attn_norm, self.eps)
        attn = torch.empty((n_tok, H, D), dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.layers):
            qkv = matmul(h, layer.wqkv, target=self.target)  # (N, (H + 2 Hkv) D)
            apply_rotary_qkv(qkv, self.cos, self.sin, positions, H, Hkv, D)
            q = qkv[:, :q_end].view(n_tok, H, D)
            k = qkv[:, q_end:k_end].view(n_tok, Hkv, D)
            v = qkv[:, k_end:].view(n_tok, Hkv, D)
            attend(i, q, k, v, attn)
            o = matmul(attn.view(n_tok, H * D), layer.wo, target=self.target)
            h, x = rms_norm(o, layer.mlp_norm, self.eps, residual=x)
            down = matmul(swiglu(matmul(h, layer.w_gate_up, target=self.target)), layer.w_down, target=self.target)
            next_norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm
            h, x = rms_norm(down, next_norm, self.eps, residual=x)  # after the last layer: the final norm
        return h

    def _forward_eager(self, steps, starts, counts) -> list[np.ndarray]:
        """Any batch. Tokens are stacked with the one-token sequences first, so their attention is one launch."""
        self.stats["eager_steps"] += 1
        order = sorted(range(len(steps)), key=lambda j: counts[j] != 1)  # stable: decode rows, then the others
        steps = [steps[j] for j in order]
        starts = [starts[j] for j in order]
        counts = [counts[j] for j in order]
        n_dec = sum(1 for n in counts if n == 1)
        pooled = self.cuda_graphs and all(self._pooled(s.cache) for s in steps)

        token_ids = np.concatenate([s.token_ids for s in steps])
        n_tok = len(token_ids)
        positions = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
        slots = np.repeat([s.cache.slot if pooled else 0 for s in steps], counts)
        lengths = np.array(starts[:n_dec], dtype=np.int64) + 1
        # One host->device copy: ids, positions, slots (per token), lengths (per decode row).
        packed = torch.from_numpy(np.concatenate([token_ids, positions, slots, lengths]).astype(np.int32))
        packed = packed.to(self.device)
        ids_dev, pos_dev, slots_dev = packed[:n_tok], packed[n_tok : 2 * n_tok], packed[2 * n_tok : 3 * n_tok]
        lengths_dev = packed[3 * n_tok :]
        max_dec = int(lengths.max()) if n_dec else 0
        pool = self.pool

        def attend(i, q, k, v, attn):
            """Store layer i's new K/V in the caches; write q's attention into attn (N, n_heads, head_dim)."""
            if pooled:
                store_kv(k, v, pool.k[i], pool.v[i], slots_dev, pos_dev)  # every token, one launch
                if n_dec:
                    decode_attention(q[:n_dec], pool.k[i], pool.v[i], lengths_dev, max_length=max_dec,
                                     out=attn[:n_dec], slots=slots_dev[:n_dec], target=self.target)
            row = 0
            for j, (s, start, n) in enumerate(zip(steps, starts, counts)):
                cache = s.cache
                if not pooled:
                    cache.write(i, start, k[row : row + n], v[row : row + n])
                if n == 1 and not pooled:
                    decode_attention(q[row : row + 1], cache.k[i][None], cache.v[i][None], lengths_dev[j : j + 1],
                                     max_length=start + 1, out=attn[row : row + 1], target=self.target)
                elif n > 1:
                    prefill_attention(q[row : row + n], cache.k[i], cache.v[i], start, out=attn[row : row + n],
                                      target=self.target)
                row += n

        x = self.embed.index_select(0, ids_dev)  # (N, hidden) residual stream
        h = self._layers(x, pos_dev, attend)
        for s, start, n in zip(steps, starts, counts):
            s.cache.length = start + n
        logits = self._logits(h, steps, counts)
        out: list = [None] * len(steps)
        for j, arr in zip(order, logits):
            out[j] = arr
        return out

    def _logits(self, h: torch.Tensor, steps: list[SequenceStep], counts: list[int]) -> list[np.ndarray]:
        """lm_head on only the (final-normed) rows that need logits; split back per step as float32 arrays."""
        ends = np.cumsum(counts)
        rows = np.concatenate([
            np.arange(end - n, end) if s.all_logits else np.array([end - 1]) for s, n, end in zip(steps, counts, ends)
        ])
        if len(rows) == h.shape[0]:
            picked = h
        else:
            picked = h.index_select(0, torch.from_numpy(rows).to(self.device))
        logits = _to_host_f32(matmul(picked, self.lm_head, target=self.target))
        sizes = [n if s.all_logits else 1 for s, n in zip(steps, counts)]
        return np.split(logits, np.cumsum(sizes)[:-1])

    # ---- the static decode path ----------------------------------------------------------------------------------

    def _bucket(self, b: int) -> int:
        return next(size for size in self.graph_batch_sizes if size >= b)

    def _static_inputs(self) -> "_StaticInputs":
        if self._static is None:
            self._static = _StaticInputs(self.graph_batch_sizes[-1], self.config.vocab_size, self.device, self.dtype)
        return self._static

    def _decode_body(self, bucket: int) -> None:
        """One decode step for the first `bucket` rows of the static inputs, logits into the static output.

        Shapes depend on `bucket` only and no value is read back to the host, so the same launches can be captured.
        """
        st, pool = self._static, self.pool
        ids, positions = st.inputs[0, :bucket], st.inputs[1, :bucket]
        lengths, slots = st.inputs[2, :bucket], st.inputs[3, :bucket]

        def attend(i, q, k, v, attn):
            """Store layer i's K/V in the pool slots; write decode attention into attn (bucket, n_heads, head_dim)."""
            store_kv(k, v, pool.k[i], pool.v[i], slots, positions)
            decode_attention(q, pool.k[i], pool.v[i], lengths, max_length=pool.window, out=attn, slots=slots,
                             target=self.target)

        h = self._layers(self.embed.index_select(0, ids), positions, attend)
        st.logits[:bucket].copy_(matmul(h, self.lm_head, target=self.target))

    def _graph(self, bucket: int):
        """The CUDA graph of `bucket`'s step, captured on first use (and again after the pool grew)."""
        if self._graphs_generation != self.pool.generation:
            self._graphs.clear()  # captured against storage that no longer exists
            self._graphs_generation = self.pool.generation
        graph = self._graphs.get(bucket)
        if graph is None:
            st = self._static
            st.pad(0, st.size)  # every row writes to the scratch slot while warming up
            st.upload()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile/load every kernel outside the capture
                self._decode_body(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_body(bucket)
            torch.cuda.synchronize(self.device)  # the padding upload is done before the host buffer is refilled
            self._graphs[bucket] = graph
            self.stats["graph_captures"] += 1
        return graph

    def _forward_static(self, steps, starts) -> list[np.ndarray]:
        """Batches of one-token steps in pooled caches, in pieces of at most the largest bucket."""
        st = self._static_inputs()
        out: list[np.ndarray] = []
        biggest = self.graph_batch_sizes[-1]
        for lo in range(0, len(steps), biggest):
            piece, piece_starts = steps[lo : lo + biggest], starts[lo : lo + biggest]
            b = len(piece)
            bucket = self._bucket(b)
            graph = self._graph(bucket) if self.capture else None
            st.host[0, :b] = [int(s.token_ids[0]) for s in piece]
            st.host[1, :b] = piece_starts
            st.host[2, :b] = [p + 1 for p in piece_starts]
            st.host[3, :b] = [s.cache.slot for s in piece]
            st.pad(b, bucket)
            st.upload()
            if graph is not None:
                graph.replay()
                self.stats["graph_replays"] += 1
            else:
                self._decode_body(bucket)
            logits = _to_host_f32(st.logits[:b])
            out.extend(np.split(logits, b))
        for s, start in zip(steps, starts):
            s.cache.length = start + 1
        self.stats["static_steps"] += 1
        return out


class _StaticInputs:
    """The static decode path's device buffers: inputs (4, size) int32 rows ids / positions / lengths / slots,
    logits (size, vocab) in the compute dtype; and a (pinned, on CUDA) host staging copy of the inputs."""

    def __init__(self, size: int, vocab: int, device: torch.device, dtype: torch.dtype):
        self.size = size
        self.inputs = torch.zeros((4, size), dtype=torch.int32, device=device)
        self.logits = torch.zeros((size, vocab), dtype=dtype, device=device)
        self._host_t = torch.zeros((4, size), dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host = self._host_t.numpy()
        self.pad(0, size)

    def pad(self, lo: int, hi: int) -> None:
        """Rows lo..hi-1 become padding: token 0 at position 0 of the scratch slot (length 1)."""
        self.host[:, lo:hi] = np.array([[0], [0], [1], [KVSlotPool.SCRATCH]], dtype=np.int32)

    def upload(self) -> None:
        """Copy the host staging inputs (4, size) int32 to the device buffer (non-blocking when pinned)."""
        self.inputs.copy_(self._host_t, non_blocking=self._host_t.is_pinned())


def _to_host_f32(t: torch.Tensor) -> np.ndarray:
    """(rows, vocab) device logits -> host float32 NumPy (bf16/fp16 widen exactly on the host, half the bytes).

    A meta tensor (launches being recorded, nothing computed) gives zeros of its shape."""
    if t.device.type == "meta":
        return np.zeros(tuple(t.shape), dtype=np.float32)
    if t.dtype == torch.float32:
        return t.to("cpu", copy=True).numpy()  # a copy even on a CPU device: t may be a static buffer
    if t.dtype == torch.bfloat16:  # bf16 is the top half of an fp32: shift the raw bits
        bits = t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return t.cpu().numpy().astype(np.float32)  # float16: NumPy knows it
