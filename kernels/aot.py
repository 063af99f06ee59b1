"""Ahead-of-time compilation, for real GPUs and without one, of every kernel launch the Triton backend makes.

    python -m tinyllama_kernels.aot [--targets sm_80 sm_90] [--models tinyllama mha mqa] [--dtypes bfloat16 float16 float32]
                          [--json PATH] [--quiet]

1. record: a TritonBackend on torch's "meta" device (shapes, dtypes and strides, no storage), planned for a named
   GPU (tinyllama_kernels.launch.A100 / H100: DOT_MODE native for bf16/fp16, that GPU's SM count), runs `script` (prefills of
   several lengths, batched decode at every CUDA-graph bucket, speculative verification beside decoding sequences
   and a prompt chunk, and the same without the slot pool) under tinyllama_kernels.launch.recording(): nothing runs, every
   launch (kernel, grid, constexprs, num_warps, num_stages, arguments) is kept. The plans come from the wrappers'
   own plan_* functions, so a change to a block size or a heuristic changes what is compiled here.
2. specialize: each launch's arguments go through Triton's own JIT binder for the CUDA backend, giving what the JIT
   would compile on that GPU: the signature, the constexprs (ints equal to 1 and unit strides included) and the
   16-byte divisibility hints (a meta tensor's data_ptr is its storage offset in bytes, as on a 256-byte aligned
   allocation).
3. compile each distinct specialization with triton.compile(ASTSource(kernel, signature, constexprs, attrs),
   target=GPUTarget("cuda", 80 | 90, 32), options) through ttir, ttgir, llir, ptx and cubin (the bundled ptxas);
   Triton's cache ($TRITON_CACHE_DIR, default ~/.triton/cache) keeps the results, so a rerun is fast.
4. check: it compiled; shared memory (metadata.shared) within the target's per-block limit; and for the hot kernels
   (matmul and attention) no local memory: no `.local` in the PTX and no spill stores in `ptxas -v`'s report
   (ptxas is run once more for that report, itself cached under the Triton cache).

Exit status 0 when every specialization passes, 1 otherwise (each problem printed). Needs triton (3.9's JIT binder
and compiler API) and torch; no GPU. Kernels are imported with TRITON_INTERPRET=0 (the interpreter's kernels cannot
be compiled); importing this module imports no kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.runtime.batch import SequenceStep
from engine.runtime.weights import LayerWeights, ModelWeights

# TinyLlama-1.1B's real shape with 2 of its 22 layers (every layer launches the same kernels), and two small configs
# for the other attention layouts and head sizes: multi-head (group 1, head_dim 128 as in Llama-2-7B) and multi-query
# (group 8, head_dim 32, tied embeddings); vocabularies of 1000 give matrices whose rows are not a multiple of 16.
MODELS = {
    "tinyllama": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                             rms_norm_eps=1e-5),
    "mha": ModelConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=128, max_position_embeddings=512,
                       rms_norm_eps=1e-5),
    "mqa": ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=True),
}
DTYPES = ("bfloat16", "float16", "float32")
TARGETS = ("sm_80", "sm_90")  # the A100's and the H100's
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in), bytes
HOT_KERNELS = ("_gemm_kernel", "_gemv_kernel", "_splitk_reduce_kernel", "_decode_partial_kernel",
               "_decode_combine_kernel", "_prefill_attention_kernel")  # matmul.py and attention_*.py
PREFILL_LENGTHS = (1, 2, 7, 16, 33, 100, 128, 300, 2048)  # 1: a one-token prompt takes the static decode path
SPECULATE = 4  # draft tokens verified per step
PROMPT_CHUNK = 256  # the scheduler's prefill chunk while others decode


def placeholder_weights(config: ModelConfig, dtype: str) -> ModelWeights:
    """Zero weights of `config`'s shapes as the loader holds a `dtype` checkpoint (uint16 bfloat16 bits, float16 or
    float32 matrices; float32 norms). np.zeros maps pages lazily: uploaded to the meta device, they cost no memory."""
    matrix = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
    c = config

    def zeros(*shape, dt=matrix):
        return np.zeros(shape, dtype=dt)

    layers = [LayerWeights(attn_norm=zeros(c.hidden_size, dt=np.float32),
                           wqkv=zeros(c.q_size + 2 * c.kv_size, c.hidden_size), wo=zeros(c.hidden_size, c.q_size),
                           mlp_norm=zeros(c.hidden_size, dt=np.float32),
                           w_gate_up=zeros(2 * c.intermediate_size, c.hidden_size),
                           w_down=zeros(c.hidden_size, c.intermediate_size))
              for _ in range(c.num_hidden_layers)]
    embed = zeros(c.vocab_size, c.hidden_size)
    lm_head = embed if c.tie_word_embeddings else zeros(c.vocab_size, c.hidden_size)
    return ModelWeights(embed=embed, layers=layers, final_norm=zeros(c.hidden_size, dt=np.float32), lm_head=lm_head)


def script(backend):
    """The forward calls whose launches are recorded: yields (label, steps) and expects `backend.forward(steps)`
    to have run before the next item (later steps extend the caches earlier ones filled)."""
    window = backend.config.max_position_embeddings

    def tokens(n):
        return np.zeros(n, dtype=np.int64)

    for n in PREFILL_LENGTHS:  # a lone prompt, as generate() runs it
        if n <= window:
            yield f"prefill T={n}", [SequenceStep(backend.new_cache(), tokens(n))]
    sizes = backend.graph_batch_sizes if backend.cuda_graphs else (1, 2)
    for b in sizes:  # ragged prompts, then one decode step of them all (the static path's bucket b when pooled)
        caches = [backend.new_cache() for _ in range(b)]
        yield f"ragged prefill B={b}", [SequenceStep(c, tokens(min(3 + 5 * j, window // 2)))
                                         for j, c in enumerate(caches)]
        yield f"decode B={b}", [SequenceStep(c, tokens(1)) for c in caches]
        del caches
    caches = [backend.new_cache() for _ in range(3)]
    yield "prompts for verification", [SequenceStep(c, tokens(40 + j)) for j, c in enumerate(caches)]
    yield f"verify {SPECULATE} drafts", [SequenceStep(caches[0], tokens(1 + SPECULATE), all_logits=True)]
    late = backend.new_cache()  # the scheduler's mix: a verification, decoding rows, a waiting prompt's chunk
    yield "verify + decode + prompt chunk", [SequenceStep(caches[0], tokens(1 + SPECULATE), all_logits=True),
                                             SequenceStep(caches[1], tokens(1)), SequenceStep(caches[2], tokens(1)),
                                             SequenceStep(late, tokens(min(PROMPT_CHUNK, window - 1)))]
    if window > 300:
        long = backend.new_cache()  # decode deep into the window: more splits of the key range
        yield "prompt near the window", [SequenceStep(long, tokens(window - 2))]
        yield "decode near the window + short", [SequenceStep(long, tokens(1)), SequenceStep(caches[1], tokens(1))]


@dataclass
class Recorded:
    """A launch and where it came from: "<model> <dtype> <static|eager> <script label>"."""

    label: str
    launch: object  # tinyllama_kernels.launch.Launch


def record(model: str, dtype: str, target) -> list[Recorded]:
    """Every launch `script` makes on a meta-device TritonBackend of MODELS[model] in `dtype`, planned for `target`
    (a tinyllama_kernels.launch.Target), with the slot pool and CUDA-graph buckets (static) and without them (eager)."""
    from tinyllama_kernels.launch import recording
    from tinyllama_kernels.triton_backend import TritonBackend

    config = MODELS[model]
    weights = placeholder_weights(config, dtype)
    out: list[Recorded] = []
    for mode, graphs in (("static", True), ("eager", False)):
        backend = TritonBackend(config, weights, dtype=dtype, device="meta", target=target, cuda_graphs=graphs)
        for label, steps in script(backend):
            with recording() as launches:
                backend.forward(steps)
            out += [Recorded(f"{model} {dtype} {mode} {label}", launch) for launch in launches]
    return out


# ---- specialization and compilation (TRITON_INTERPRET=0) --------------------------------------------------------

_CUDA_BACKENDS: dict = {}
_BINDERS: dict = {}


def _cuda_backend(capability: int):
    if capability not in _CUDA_BACKENDS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        gpu = GPUTarget("cuda", capability, 32)
        _CUDA_BACKENDS[capability] = (gpu, make_backend(gpu))
    return _CUDA_BACKENDS[capability]


@dataclass(frozen=True)
class Specialization:
    """What Triton's JIT compiles for one launch on one GPU: kernel, signature, constexprs, attrs and options."""

    kernel_name: str
    capability: int
    signature: tuple  # ((arg name, type), ...)
    constexprs: tuple  # ((arg name, value), ...), the launch's constexprs and the args the JIT made constant
    attrs: tuple  # ((arg name, attributes), ...): 16-byte divisibility hints
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        """One line: kernel, warps/stages, constexprs and argument types."""
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        args = ", ".join(f"{k}:{t}" + ("/16" if dict(self.attrs).get(k) else "") for k, t in self.signature
                         if t != "constexpr")
        return f"{self.kernel_name} w{self.num_warps} s{self.num_stages} [{consts}] ({args})"


@dataclass(frozen=True)
class CompileJob:
    """What triton.compile needs for one Specialization, picklable (the kernel named by module and function)."""

    module: str
    function: str
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [[attribute, value]]}
    options: dict  # CUDAOptions fields
    capability: int


def specialize(launch, capability: int) -> tuple[Specialization, CompileJob]:
    """(Specialization, CompileJob) of a recorded launch on a CUDA GPU of `capability`, by Triton's own JIT binder
    (the code JITFunction.run uses on a GPU). The kernel must be a JITFunction (TRITON_INTERPRET=0)."""
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.plan.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{launch.plan.name} is not a JITFunction: import the kernels with TRITON_INTERPRET=0")
    gpu, backend = _cuda_backend(capability)
    key = (id(kernel), capability)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.plan.constexprs, num_warps=launch.plan.num_warps, num_stages=launch.plan.num_stages)
    kwargs["debug"] = kernel.debug or knobs.runtime.debug  # what JITFunction.run adds
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (triton 3.9)
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = _BINDERS[key](*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    spec = Specialization(
        kernel_name=kernel.fn.__name__, capability=capability,
        signature=tuple(signature.items()),
        constexprs=tuple((names[path[0]], constexprs[path]) for path in sorted(constexprs)),
        attrs=tuple((names[path[0]], tuple(tuple(a) for a in attrs[path])) for path in sorted(attrs) if attrs[path]),
        num_warps=options.num_warps, num_stages=options.num_stages,
    )
    job = CompileJob(kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs, dict(options.__dict__),
                     capability)
    return spec, job


def _cache_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "tinyllama-aot"


def _ptxas_flags(capability: int, fp_fusion: bool) -> list[str]:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}"]
    return flags if fp_fusion else flags[:1] + ["--fmad=false"] + flags[1:]


def _report_file(ptx: str, capability: int, fp_fusion: bool) -> Path:
    key = hashlib.sha256((ptx + " ".join(_ptxas_flags(capability, fp_fusion))).encode()).hexdigest()
    return _cache_dir() / f"{key}.json"


def _parse_ptxas_log(log: str) -> dict:
    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"registers": number(r"Used (\d+) registers"), "stack_frame": number(r"(\d+) bytes stack frame"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads")}


def _store_report(path: Path, report: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)  # atomic: concurrent runs never read half a file
    return report


def ptxas_report(ptx: str, capability: int, fp_fusion: bool) -> dict:
    """Registers, stack frame and spill bytes per `ptxas -v` (the bundled ptxas, Triton's flags), cached by the
    PTX's hash under the Triton cache."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = _report_file(ptx, capability, fp_fusion)
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(capability).path, *_ptxas_flags(capability, fp_fusion), str(src), "-o",
                               str(src.with_suffix(".o"))], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas -v failed: {(done.stdout + done.stderr)[-2000:]}")
    return _store_report(path, _parse_ptxas_log(done.stdout + done.stderr))


def compile_one(spec: Specialization, job: CompileJob) -> dict:
    """Compile one specialization (triton.compile, the whole pipeline to cubin) and check it: a result dict with
    shared, registers, spills, ptx_local, seconds, error and problems (empty when it passes)."""
    import importlib

    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.function)
    gpu, _ = _cuda_backend(job.capability)
    result = {"kernel": spec.kernel_name, "target": f"sm_{spec.capability}", "describe": spec.describe(),
              "num_warps": spec.num_warps, "num_stages": spec.num_stages, "constexprs": dict(spec.constexprs),
              "signature": dict(spec.signature), "error": None, "problems": []}
    t0 = time.perf_counter()
    dump = knobs.nvidia.dump_ptxas_log
    try:
        log = io.StringIO()  # a compile that runs ptxas prints its -v report here: no second ptxas run for it
        knobs.nvidia.dump_ptxas_log = True
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs), target=gpu,
                                      options=job.options)
        ptx = compiled.asm["ptx"]
        fp_fusion = job.options["enable_fp_fusion"]
        if "ptxas info" in log.getvalue():
            report = _store_report(_report_file(ptx, job.capability, fp_fusion), _parse_ptxas_log(log.getvalue()))
        else:  # from Triton's cache
            report = ptxas_report(ptx, job.capability, fp_fusion)
        result.update(shared=int(compiled.metadata.shared), ptx_local=bool(re.search(r"\.local\b", ptx)), **report)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a finding, reported with the rest
        result["error"] = f"{type(e).__name__}: {e}"[-3000:]
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["problems"] = problems(result)
    return result


def problems(result: dict) -> list[str]:
    """What is wrong with one compile result: no compile, shared memory over the limit, local memory in a hot kernel."""
    if result["error"]:
        return [f"does not compile: {result['error'].splitlines()[0][:300]}"]
    found = []
    limit = SHARED_LIMIT[int(result["target"].removeprefix("sm_"))]
    if result["shared"] > limit:
        found.append(f"shared memory {result['shared']} B > the {limit} B per-block limit")
    if result["kernel"] in HOT_KERNELS:
        if result["ptx_local"]:
            found.append("local memory in the PTX (.local)")
        if result["spill_stores"] or result["spill_loads"]:
            found.append(f"register spills: {result['spill_stores']} B stores, {result['spill_loads']} B loads "
                         f"({result['registers']} registers)")
    return found


def representative_key(spec: Specialization) -> tuple:
    """What decides a kernel's code shape: target, kernel, block sizes and modes (upper-case constexprs), warps,
    stages and pointer types. Specializations that differ only in the JIT's integer hints (an int equal to 1, or
    a multiple of 16) share it."""
    return (spec.capability, spec.kernel_name, tuple((k, v) for k, v in spec.constexprs if k.isupper()),
            spec.num_warps, spec.num_stages, tuple((k, t) for k, t in spec.signature if t.startswith("*")))


def sweep(targets=TARGETS, models=tuple(MODELS), dtypes=DTYPES, every: bool = True, jobs: int = 1,
          log=print) -> dict:
    """Record, specialize, compile and check every launch of every (model, dtype) for every target.

    every=False compiles one specialization per representative_key (the first launched) instead of all. jobs > 1
    compiles in that many processes. Returns {"launches": count, "specializations": count, "results": [compile
    result + "labels" (where it was launched) + "same_code_as" (how many specializations it stands for)]}."""
    from tinyllama_kernels.launch import A100, H100

    by_name = {"sm_80": A100, "sm_90": H100}
    specs: dict[Specialization, dict] = {}
    n_launches = 0
    for name in targets:
        target = by_name[name]
        for model in models:
            for dtype in dtypes:
                for rec in record(model, dtype, target):
                    n_launches += 1
                    spec, job = specialize(rec.launch, target.capability)
                    entry = specs.setdefault(spec, {"job": job, "labels": set()})
                    entry["labels"].add(rec.label)
    chosen: dict[tuple, tuple[Specialization, dict]] = {}
    for spec, entry in specs.items():
        key = spec if every else representative_key(spec)
        if key in chosen:
            chosen[key][1]["labels"] |= entry["labels"]
            chosen[key][1]["same_code_as"] += 1
        else:
            chosen[key] = (spec, {"job": entry["job"], "labels": set(entry["labels"]), "same_code_as": 1})
    todo = list(chosen.values())
    log(f"[aot] {n_launches} launches recorded, {len(specs)} distinct specializations; compiling {len(todo)} "
        f"in {jobs} process(es)")
    t0 = time.perf_counter()
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            compiled = list(pool.map(compile_one, [s for s, _ in todo], [e["job"] for _, e in todo], chunksize=4))
    else:
        compiled = [compile_one(s, e["job"]) for s, e in todo]
    results = []
    for (spec, entry), result in zip(todo, compiled):
        result["labels"] = sorted(entry["labels"])
        result["same_code_as"] = entry["same_code_as"]
        results.append(result)
        if result["problems"]:
            log(f"[aot] FAIL {result['target']} {spec.describe()}: {'; '.join(result['problems'])}")
    return {"launches": n_launches, "specializations": len(specs), "results": results,
            "seconds": round(time.perf_counter() - t0, 1)}


def summary(results: list[dict]) -> str:
    """Per target and kernel: specializations, most shared memory and registers, spills."""
    rows = {}
    for r in results:
        if r["error"]:
            continue
        key = (r["target"], r["kernel"])
        row = rows.setdefault(key, {"n": 0, "shared": 0, "registers": 0, "spills": 0, "local": False})
        row["n"] += 1
        row["shared"] = max(row["shared"], r["shared"])
        row["registers"] = max(row["registers"], r["registers"])
        row["spills"] = max(row["spills"], r["spill_stores"])
        row["local"] |= r["ptx_local"]
    lines = [f"{'target':7} {'kernel':27} {'specs':>5} {'max shared':>11} {'max regs':>8} {'spill B':>7} .local"]
    for (target, kernel), row in sorted(rows.items()):
        lines.append(f"{target:7} {kernel:27} {row['n']:5d} {row['shared']:11d} {row['registers']:8d} "
                     f"{row['spills']:7d} {'yes' if row['local'] else 'no'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinyllama_kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--representatives", action="store_true",
                   help="compile one specialization per kernel code shape (block sizes, modes, warps, stages, "
                        "pointer types), not every integer-hint variant")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--json", type=Path, help="write every specialization's result here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("tinyllama_kernels.aot: TRITON_INTERPRET is set; the interpreter's kernels cannot be compiled: run with "
              "TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # before any kernel import (triton_backend would pick the interpreter)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    out = sweep(args.targets, args.models, args.dtypes, every=not args.representatives, jobs=max(1, args.jobs),
                log=lambda msg: print(msg, flush=True))
    print(summary(out["results"]))
    bad = [r for r in out["results"] if r["problems"]]
    print(f"[aot] {len(out['results'])} compiled in {out['seconds']} s: "
          + (f"{len(bad)} FAILED" if bad else "all compile, no local memory in the hot kernels, shared memory "
             "within the per-block limits"), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
