"""TritonBackend: the engine's backend interface (new_cache / forward) with every op a Triton kernel.

On a CUDA machine the kernels run on the GPU. Without CUDA they run in Triton's CPU interpreter on CPU
tensors (slow; for tests): TRITON_INTERPRET=1 is then set here unless the environment already chose, and
it must be in place before triton first compiles a kernel module (i.e. before any `kernels.*` kernel import).
torch only holds the arrays (allocation, host<->device copies, gathers); the arithmetic is the kernels'.
"""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ruff: noqa: E402
from engine.batch import SequenceStep
from engine.config import ModelConfig
from engine.model_weights import ModelWeights
from engine.rope import rope_tables
from kernels._common import interpreting
from kernels.attention_decode import decode_attention
from kernels.attention_prefill import prefill_attention
from kernels.device_cache import DeviceKVCache
from kernels.matmul import matmul
from kernels.norm import rms_norm
from kernels.rotary import apply_rotary_qkv
from kernels.swiglu import swiglu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device() -> torch.device:
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if not interpreting():
        raise RuntimeError("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU")
    return torch.device("cpu")


class _DeviceLayer:
    """One decoder layer's weights on the device, in the compute dtype (HF [out, in] layout, fused)."""

    def __init__(self, layer, to_device):
        self.attn_norm = to_device(layer.attn_norm)
        self.wqkv = to_device(layer.wqkv)
        self.wo = to_device(layer.wo)
        self.mlp_norm = to_device(layer.mlp_norm)
        self.w_gate_up = to_device(layer.w_gate_up)
        self.w_down = to_device(layer.w_down)


class TritonBackend:
    """Runs a Llama model with the Triton kernels; same interface and results as engine.numpy_backend.NumpyBackend.

    dtype: "float32" | "bfloat16" | "float16" | "auto" (bfloat16 on a GPU, float32 in the interpreter).
    """

    name = "triton"

    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: str = "auto", device=None):
        self.config = config
        self.device = torch.device(device) if device is not None else _default_device()
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
        self.dtype = DTYPES[dtype]

        def to_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=self.dtype)

        self.embed = to_device(weights.embed)
        self.lm_head = self.embed if weights.lm_head is weights.embed else to_device(weights.lm_head)
        self.final_norm = to_device(weights.final_norm)
        self.layers = [_DeviceLayer(layer, to_device) for layer in weights.layers]
        cos, sin = rope_tables(config)  # (max_pos, head_dim) float32, kept in fp32
        self.cos = torch.from_numpy(cos).to(self.device)
        self.sin = torch.from_numpy(sin).to(self.device)
        self.eps = float(config.rms_norm_eps)

    def new_cache(self) -> DeviceKVCache:
        """An empty device KV cache for one sequence."""
        c = self.config
        return DeviceKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.max_position_embeddings,
                             self.dtype, self.device)

    def forward(self, steps: list[SequenceStep]) -> list[np.ndarray]:
        """Run every step's new tokens through the model, appending their K/V to each step's cache.

        All tokens are stacked into one (N, hidden) activation so each weight is streamed once per call; attention
        runs per sequence over its own cache (prefill kernel for n > 1 new tokens, split-KV decode kernel for n = 1).
        Returns per step logits (n or 1, vocab) float32 (NumPy, on the host).
        """
        c = self.config
        starts = [s.cache.length for s in steps]
        counts = [len(s.token_ids) for s in steps]
        for s, start, n in zip(steps, starts, counts):
            s.cache.reserve(start + n)  # raises before any cache is touched if a sequence would overflow
        token_ids = np.concatenate([s.token_ids for s in steps])
        positions = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
        positions_dev = torch.from_numpy(positions.astype(np.int32)).to(self.device)
        lengths_dev = [torch.tensor([start + n], dtype=torch.int32, device=self.device)
                       for start, n in zip(starts, counts)]
        n_tok = len(token_ids)
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_end, k_end = c.q_size, c.q_size + c.kv_size

        x = self.embed.index_select(0, torch.from_numpy(token_ids).to(self.device))  # (N, hidden) residual stream
        h = rms_norm(x, self.layers[0].attn_norm, self.eps)
        attn = torch.empty((n_tok, H, D), dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.layers):
            qkv = matmul(h, layer.wqkv)  # (N, (H + 2 Hkv) D)
            apply_rotary_qkv(qkv, self.cos, self.sin, positions_dev, H, Hkv, D)
            q = qkv[:, :q_end].view(n_tok, H, D)
            k = qkv[:, q_end:k_end].view(n_tok, Hkv, D)
            v = qkv[:, k_end:].view(n_tok, Hkv, D)
            row = 0
            for s, start, n, length in zip(steps, starts, counts, lengths_dev):
                cache = s.cache
                cache.write(i, start, k[row : row + n], v[row : row + n])
                if n == 1:
                    decode_attention(q[row : row + 1], cache.k[i][None], cache.v[i][None], length,
                                     max_length=start + 1, out=attn[row : row + 1])
                else:
                    prefill_attention(q[row : row + n], cache.k[i], cache.v[i], start, out=attn[row : row + n])
                row += n
            o = matmul(attn.view(n_tok, H * D), layer.wo)
            h, x = rms_norm(o, layer.mlp_norm, self.eps, residual=x)
            down = matmul(swiglu(matmul(h, layer.w_gate_up)), layer.w_down)
            next_norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm
            h, x = rms_norm(down, next_norm, self.eps, residual=x)  # after the last layer: the final norm
        for s, start, n in zip(steps, starts, counts):
            s.cache.length = start + n
        return self._logits(h, steps, counts)

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
        logits = matmul(picked, self.lm_head).float().cpu().numpy()
        sizes = [n if s.all_logits else 1 for s, n in zip(steps, counts)]
        return np.split(logits, np.cumsum(sizes)[:-1])
