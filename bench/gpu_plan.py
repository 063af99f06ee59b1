"""What the Triton backend should reach on a GPU, worked out without one (`python -m bench.gpu_check --plan`).

The launches of one decode step are recorded (tinyllama_kernels.launch.recording) from a TritonBackend on torch's meta device
planned for the GPU (tinyllama_kernels.launch.H100 / A100: its SM count decides the split-K and attention splits), for
TinyLlama-1.1B in bf16 at batch 1 and 32. Each launch's bytes come from its arguments' shapes and dtypes: what the
kernel must read and write at least once (a weight once per launch, however many programs share it; KV reads at
the given context per sequence). The step's floor is those bytes over the GPU's HBM bandwidth; the batch-32 step
is also held to the compute floor (2 FLOP per weight per token at the dense bf16 peak). Prefill's ceiling is its
FLOPs (prefill_flops, the count gpu_check reports measured prefills in) over the peak. These are the targets
gpu_check's measurements are judged against.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """A GPU's datasheet figures and its tinyllama_kernels.launch.Target name."""

    name: str
    target: str  # "H100" | "A100": tinyllama_kernels.launch's Target of the same name
    hbm_tb_s: float  # HBM bandwidth, TB/s
    bf16_tflop_s: float  # dense bf16 tensor-core peak, TFLOP/s


GPUS = (GPU("H100 SXM5 80 GB (HBM3)", "H100", 3.35, 989.0), GPU("A100 SXM4 80 GB (HBM2e)", "A100", 2.0, 312.0))
DECODE_BATCHES = (1, 32)
PREFILL_TOKENS = (512, 2048)


def _tensor_bytes(t, numel=None) -> int:
    return (t.numel() if numel is None else numel) * t.element_size()


def launch_bytes(launch, context: int) -> int:
    """Bytes one recorded launch must move to and from memory at least once (inputs read once, outputs written
    once); decode attention reads `context` cached positions per sequence."""
    name, a, grid, cx = launch.plan.name, launch.args, launch.plan.grid, launch.plan.constexprs
    if name == "_gemm_kernel":  # x, w, y, M, N, K
        x, w, y, M, N, K = a[:6]
        return _tensor_bytes(x, M * K) + _tensor_bytes(w, N * K) + _tensor_bytes(y, M * N)
    if name == "_gemv_kernel":  # x, w, out, M, N, K; grid (column tiles, K splits): out holds one M x N per split
        x, w, out, M, N, K = a[:6]
        return _tensor_bytes(x, M * K) + _tensor_bytes(w, N * K) + _tensor_bytes(out, grid[1] * M * N)
    if name == "_splitk_reduce_kernel":  # part, y, MN, SPLIT_K
        part, y, mn, split = a[:4]
        return _tensor_bytes(part, split * mn) + _tensor_bytes(y, mn)
    if name == "_decode_partial_kernel":  # q, k, v, lengths, slots, part_o, part_ml, head_dim, group; grid (S, Hkv, B)
        q, k, v, lengths, slots, part_o, part_ml, head_dim, group = a[:9]
        n_splits, n_kv, batch = grid
        kv = 2 * batch * n_kv * context * head_dim * k.element_size()
        partials = batch * n_kv * group * n_splits * (head_dim + 2) * 4  # every split writes its (acc, max, sum)
        return _tensor_bytes(q, batch * n_kv * group * head_dim) + kv + partials + 2 * batch * lengths.element_size()
    if name == "_decode_combine_kernel":  # part_o, part_ml, o, n_splits, head_dim; grid (H, B)
        part_o, part_ml, o, n_splits, head_dim = a[:5]
        heads, batch = grid
        return batch * heads * n_splits * (head_dim + 2) * 4 + _tensor_bytes(o, batch * heads * head_dim)
    if name == "_prefill_attention_kernel":  # q, k, v, o, T, start_pos, head_dim, group
        q, k, v, o, T, start, head_dim, group = a[:8]
        n_kv = k.shape[0]
        return 2 * _tensor_bytes(q, T * n_kv * group * head_dim) + 2 * (start + T) * n_kv * head_dim * k.element_size()
    if name == "_rms_norm_kernel":  # x, res, w, y, h, N; grid (T,)
        x, res, w, y, h, n = a[:6]
        rows = grid[0] * n
        extra = _tensor_bytes(res, rows) + _tensor_bytes(h, rows) if cx["HAS_RESIDUAL"] else 0
        return _tensor_bytes(x, rows) + _tensor_bytes(w, n) + _tensor_bytes(y, rows) + extra
    if name == "_rotary_kernel":  # x, y, cos, sin, positions, n_heads, half; grid (T, head blocks), in place
        x, y, cos, sin, pos, heads, half = a[:7]
        tokens = grid[0]
        return 2 * _tensor_bytes(x, tokens * heads * 2 * half) + 2 * _tensor_bytes(cos, tokens * 2 * half) + \
            _tensor_bytes(pos, tokens)
    if name == "_swiglu_kernel":  # gate_up, y, I; grid (M, column blocks)
        gu, y, inter = a[:3]
        return _tensor_bytes(gu, grid[0] * 2 * inter) + _tensor_bytes(y, grid[0] * inter)
    if name == "_store_kv_kernel":  # k, v, k_cache, v_cache, slots, positions, n_kv_heads, head_dim; grid (T,)
        k, v, kc, vc, slots, pos, n_kv, head_dim = a[:8]
        values = grid[0] * n_kv * head_dim
        return 2 * (_tensor_bytes(k, values) + _tensor_bytes(kc, values)) + grid[0] * 2 * slots.element_size()
    raise ValueError(f"no byte count for kernel {name}")


def decode_step(config, gpu: GPU, batch: int, context: int) -> dict:
    """One static-path (CUDA-graph) decode step of `batch` sequences at `context` positions each, recorded for `gpu`:
    {"bytes": {kernel: bytes}, "launches": {kernel: count}, "total_bytes", "seconds" (memory floor),
    "compute_seconds", "tok_per_s" (aggregate, at the slower floor)}."""
    import numpy as np

    from engine.runtime.batch import SequenceStep
    from tinyllama_kernels import launch as launch_mod
    from tinyllama_kernels.aot import placeholder_weights
    from tinyllama_kernels.triton_backend import TritonBackend

    target = getattr(launch_mod, gpu.target)
    backend = TritonBackend(config, placeholder_weights(config, "bfloat16"), dtype="bfloat16", device="meta",
                            target=target, graph_batch_sizes=(batch,))
    caches = [backend.new_cache() for _ in range(batch)]
    for c in caches:
        c.length = context - 1  # the step appends position context-1: `context` positions are read
    with launch_mod.recording() as launches:
        backend.forward([SequenceStep(c, np.zeros(1, dtype=np.int64)) for c in caches])
    assert backend.stats["static_steps"] == 1, "the step did not take the static (CUDA-graph) path"
    by_kernel: dict[str, int] = {}
    counts: dict[str, int] = {}
    for x in launches:
        by_kernel[x.plan.name] = by_kernel.get(x.plan.name, 0) + launch_bytes(x, context)
        counts[x.plan.name] = counts.get(x.plan.name, 0) + 1
    # the two torch ops of the step: the embedding rows gathered, the logits copied into the graph's output buffer
    by_kernel["embedding gather (torch)"] = 2 * batch * config.hidden_size * 2
    by_kernel["logits copy (torch)"] = 2 * batch * config.vocab_size * 2
    total = sum(by_kernel.values())
    seconds = total / (gpu.hbm_tb_s * 1e12)
    flops = 2 * batch * (matmul_params(config) + config.hidden_size * config.vocab_size)
    compute = flops / (gpu.bf16_tflop_s * 1e12)
    return {"batch": batch, "context": context, "bytes": by_kernel, "launches": counts, "total_bytes": total,
            "seconds": seconds, "compute_seconds": compute, "tok_per_s": batch / max(seconds, compute)}


def matmul_params(config) -> int:
    """Multiply-accumulate weights per token through the decoder layers (lm_head apart)."""
    c = config
    per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + \
        3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer


def attention_flops(config, tokens: int) -> int:
    """Causal prefill from an empty cache: QK^T and PV over (t + 1) keys for query t, every layer and head."""
    c = config
    pairs = tokens * (tokens + 1) // 2
    return c.num_hidden_layers * c.num_attention_heads * 2 * 2 * c.head_dim * pairs


def prefill_flops(config, tokens: int) -> int:
    """A `tokens` prefill from an empty cache: decoder matmuls, lm_head on the last row, causal attention."""
    return 2 * matmul_params(config) * tokens + 2 * config.hidden_size * config.vocab_size + \
        attention_flops(config, tokens)


def prefill_ceiling(config, gpu: GPU, tokens: int) -> dict:
    """prefill_flops of `tokens` and the fastest that runs at the GPU's dense bf16 peak."""
    flops = prefill_flops(config, tokens)
    seconds = flops / (gpu.bf16_tflop_s * 1e12)
    return {"tokens": tokens, "flops": flops, "seconds": seconds, "tok_per_s": tokens / seconds}


def plan(context: int = 256) -> dict:
    """Decode floors and prefill ceilings of TinyLlama-1.1B (its real config) in bf16 on every GPU in GPUS."""
    from bench.checkpoints import TINYLLAMA_SHAPE
    from engine.config import ModelConfig

    shape = dict(TINYLLAMA_SHAPE)
    shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    config = ModelConfig(**shape)
    out = {"model": "TinyLlama-1.1B (22 layers, hidden 2048, 32/4 heads, vocab 32000), bf16 weights",
           "context": context, "gpus": []}
    for gpu in GPUS:
        out["gpus"].append({"gpu": gpu.name, "hbm_tb_s": gpu.hbm_tb_s, "bf16_tflop_s": gpu.bf16_tflop_s,
                            "decode": [decode_step(config, gpu, b, context) for b in DECODE_BATCHES],
                            "prefill": [prefill_ceiling(config, gpu, t) for t in PREFILL_TOKENS]})
    return out


def format_plan(p: dict) -> str:
    """The plan as a table per GPU: bytes per kernel at each batch, floors and ceilings."""
    lines = [f"{p['model']}; decode steps on the static (CUDA-graph) path, {p['context']} cached positions per "
             f"sequence; bytes = what each kernel must read and write once"]
    for g in p["gpus"]:
        steps = g["decode"]
        lines += ["", f"{g['gpu']}: {g['hbm_tb_s']} TB/s, {g['bf16_tflop_s']:.0f} dense bf16 TFLOP/s"]
        names = list(dict.fromkeys(name for s in steps for name in s["bytes"]))  # every kernel, first seen first
        lines.append(f"  {'kernel':28}" + "".join(f" {'B=' + str(s['batch']) + ' launches':>14} {'MB':>9}"
                                                  for s in steps))
        for name in names:
            lines.append(f"  {name:28}" + "".join(f" {s['launches'].get(name, '')!s:>14} "
                                                  f"{s['bytes'].get(name, 0) / 1e6:9.2f}" for s in steps))
        lines.append(f"  {'total':28}" + "".join(f" {'':>14} {s['total_bytes'] / 1e6:9.2f}" for s in steps))
        for s in steps:
            bound = "memory" if s["seconds"] >= s["compute_seconds"] else "compute"
            lines.append(f"  decode B={s['batch']}: floor {s['tok_per_s']:,.0f} tok/s aggregate "
                         f"({s['tok_per_s'] / s['batch']:,.0f} per sequence; {bound}-bound: "
                         f"{s['seconds'] * 1e3:.3f} ms of memory, {s['compute_seconds'] * 1e3:.3f} ms of compute)")
        for f in g["prefill"]:
            lines.append(f"  prefill {f['tokens']}: {f['flops'] / 1e12:.2f} TFLOP -> at least "
                         f"{f['seconds'] * 1e3:.2f} ms, at most {f['tok_per_s']:,.0f} tok/s")
    return "\n".join(lines)
