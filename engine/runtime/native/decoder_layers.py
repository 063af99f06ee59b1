"""Every decoder layer of a pass in one call of the kernels (`DecoderLayers`, tl_decoder_layers in api.c)."""
from __future__ import annotations

import ctypes

import numpy as np

from .kernels import ATTENTION_MAX_HEAD_DIM, KQUANT_TYPES, QUANT_TYPES, WEIGHT_TYPES, StepAttention, weight_parts
from .library import _require


class _Layer(ctypes.Structure):
    _fields_ = [("wqkv", ctypes.c_void_p), ("wo", ctypes.c_void_p), ("w_gate_up", ctypes.c_void_p),
                ("w_down", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("next_norm", ctypes.c_void_p),
                ("wqkv_s", ctypes.c_void_p), ("wo_s", ctypes.c_void_p), ("w_gate_up_s", ctypes.c_void_p),
                ("w_down_s", ctypes.c_void_p), ("parts", ctypes.c_void_p * 4), ("n_parts", ctypes.c_longlong * 4)]


class _Stack(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_longlong), ("inter", ctypes.c_longlong), ("n_heads", ctypes.c_longlong),
                ("n_kv_heads", ctypes.c_longlong), ("head_dim", ctypes.c_longlong), ("wtype", ctypes.c_longlong),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


class DecoderLayers:
    """Every decoder layer of a forward pass in ONE kernel call (tl_decoder_layers in api.c): the same kernels in the
    same order as the NumPy backend's layer loop, so the same bits, without ~9 Python calls per layer (about 2-3 ms
    of a TinyLlama batch-1 step). For passes whose every matmul runs on the kernels.

    layers: per layer (wqkv, wo, w_gate_up, w_down, mlp_norm, next_norm): matrices (out, in) with contiguous rows in
    one dtype (float32, uint16 bf16 bits or float16), or QuantMatrix of one kind (int8, int4), norms (H,) float32,
    next_norm the next layer's input norm (the final norm after the last); cos, sin: (positions, head_dim) float32
    tables."""

    def __init__(self, layers: list[tuple], hidden: int, inter: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 eps: float, cos: np.ndarray, sin: np.ndarray):
        self.lib = _require()
        q, kv = n_heads * head_dim, n_kv_heads * head_dim
        shapes = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter), (hidden,), (hidden,)]
        if self._mixed(layers):  # matrices in llama.cpp's block formats, or of more than one format: as parts
            self._parts_stack(layers, shapes)
        else:
            self._uniform_stack(layers, shapes)
        if cos.dtype != np.float32 or sin.dtype != np.float32 or not cos.flags.c_contiguous \
                or not sin.flags.c_contiguous or cos.shape[1] != head_dim or head_dim > ATTENTION_MAX_HEAD_DIM:
            raise ValueError("DecoderLayers: unsupported rotary tables")
        self.stack = _Stack(hidden, inter, n_heads, n_kv_heads, head_dim, self.wtype, float(eps),
                            float(np.float32(1.0 / np.sqrt(head_dim))), cos.ctypes.data, sin.ctypes.data)
        self._keep = (layers, cos, sin, self._keep_parts)  # what the pointers point into stays alive with this object
        self.width = q + 2 * kv + q + hidden + 3 * inter  # scratch floats per row
        self.positions = cos.shape[0]

    @staticmethod
    def _mixed(layers: list[tuple]) -> bool:
        """Whether the stack's matrices need the parts path: a block format (or rows of parts), or not one kind."""
        matrices = [a for layer in layers for a in layer[:4]]
        if any(hasattr(a, "parts") or getattr(a, "kind", None) in KQUANT_TYPES for a in matrices):
            return True
        kinds = {getattr(a, "kind", None) if not isinstance(a, np.ndarray) else a.dtype for a in matrices}
        return len(kinds) > 1

    def _parts_stack(self, layers: list[tuple], shapes: list[tuple]) -> None:
        """Every matrix as parts (kernels.h's tl_wpart; api.c's tl_matmul_parts runs them), norms as pointers."""
        built, self._keep_parts = [], []
        for layer in layers:
            for a, shape in zip(layer, shapes):
                if tuple(a.shape) != shape or (len(shape) == 1 and (a.dtype != np.float32 or not a.flags.c_contiguous)):
                    raise ValueError(f"DecoderLayers: a weight of shape {tuple(a.shape)} does not fit {shape}")
            arrays = [weight_parts(a) for a in layer[:4]]
            self._keep_parts += arrays
            parts = (ctypes.c_void_p * 4)(*[ctypes.cast(arr, ctypes.c_void_p).value for arr, _ in arrays])
            counts = (ctypes.c_longlong * 4)(*[len(arr) for arr, _ in arrays])
            built.append(_Layer(None, None, None, None, layer[4].ctypes.data, layer[5].ctypes.data, None, None, None,
                                None, parts, counts))
        self.layers = (_Layer * len(layers))(*built)
        self.wtype = 0

    def _uniform_stack(self, layers: list[tuple], shapes: list[tuple]) -> None:
        """Every matrix of one dtype (float32, bf16 bits, float16) or one quantized kind (int8, int4)."""
        quantized = getattr(layers[0][0], "kind", None)  # an engine.runtime.quant.QuantMatrix stack
        wtype = QUANT_TYPES.get(quantized) if quantized else WEIGHT_TYPES.get(layers[0][0].dtype)
        self._keep_parts = []
        for layer in layers:
            for a, shape in zip(layer, shapes):
                if quantized and len(shape) == 2:
                    if getattr(a, "kind", None) != quantized or tuple(a.shape) != shape \
                            or not a.data.flags.c_contiguous or not a.scales.flags.c_contiguous:
                        raise ValueError(f"DecoderLayers: a weight {type(a).__name__} {getattr(a, 'shape', '')} "
                                         f"does not fit {quantized} {shape}")
                    continue
                dtype = np.float32 if len(shape) == 1 else layer[0].dtype
                if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
                    raise ValueError(f"DecoderLayers: a weight of {getattr(a, 'dtype', type(a))}"
                                     f"{getattr(a, 'shape', '')} does not fit {shape}")
        if wtype is None:
            raise ValueError("DecoderLayers: unsupported weight dtype")

        def pointers(layer) -> list:
            if not quantized:
                return [a.ctypes.data for a in layer]
            return ([a.data.ctypes.data for a in layer[:4]] + [a.ctypes.data for a in layer[4:]]
                    + [a.scales.ctypes.data for a in layer[:4]])

        self.layers = (_Layer * len(layers))(*[_Layer(*pointers(layer)) for layer in layers])
        self.wtype = wtype

    def __call__(self, x: np.ndarray, h: np.ndarray, positions: np.ndarray, attention: StepAttention) -> None:
        """Run every layer on x, h: (N, H) float32 C-contiguous (the residual stream and its input-normed copy),
        updated in place; positions (N,) of the rows; attention: the pass's StepAttention (its caches get the keys
        and values). After the call h holds the final norm's output, as after the NumPy loop."""
        n, hidden = x.shape
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        if (x.dtype != np.float32 or h.dtype != np.float32 or h.shape != x.shape or not x.flags.c_contiguous
                or not h.flags.c_contiguous or hidden != self.stack.hidden or attention.total != n
                or pos.shape != (n,) or (n and (pos.min() < 0 or pos.max() >= self.positions))):
            raise ValueError("DecoderLayers: x, h, positions or the attention's rows do not fit")
        scratch = np.empty(n * self.width, dtype=np.float32)
        a = attention
        self.lib.lib.tl_decoder_layers(self.lib.isa, ctypes.byref(self.stack), self.layers, len(self.layers),
                                       x.ctypes.data, h.ctypes.data, n, pos.ctypes.data, len(a.counts),
                                       a.rows.ctypes.data, a.counts.ctypes.data, a.starts.ctypes.data, a.k_ptrs,
                                       a.v_ptrs, a.capacity.ctypes.data, scratch.ctypes.data, self.lib.threads)
