"""Every Triton kernel launch the backend makes on a GPU, compiled for sm_80 (A100) and sm_90 (H100) without one.

In this process (the interpreter's kernels): the launches recorded on torch's meta device for a named GPU target are
the launches a real run makes, and for TinyLlama's shape they take the GPU-side choices (DOT_MODE native, the
target's SM count, every CUDA-graph bucket, split-K, verification). In a subprocess with TRITON_INTERPRET=0:
`python -m tinyllama_kernels.aot` compiles them all the way to cubin and checks shared memory and local memory, and its checks
are shown to catch a kernel that spills and one that asks for too much shared memory.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.kernel_support import torch  # first: sets TRITON_INTERPRET
from engine.runtime.batch import SequenceStep
from tinyllama_kernels import aot
from tinyllama_kernels._common import DOT_IEEE, DOT_NATIVE, DOT_UPCAST
from tinyllama_kernels.launch import A100, H100, INTERPRETER, recording
from tinyllama_kernels.triton_backend import GRAPH_BATCH_SIZES, TritonBackend
from tests.conftest import REPO
from tests.test_kernels_backend import _config, _weights

ALL_KERNELS = {"_gemm_kernel", "_gemv_kernel", "_splitk_reduce_kernel", "_decode_partial_kernel",
               "_decode_combine_kernel", "_prefill_attention_kernel", "_rms_norm_kernel", "_rotary_kernel",
               "_swiglu_kernel", "_store_kv_kernel"}
DOT_KERNELS = {"_gemm_kernel", "_decode_partial_kernel", "_prefill_attention_kernel"}


def _describe(launch) -> tuple:
    """A launch as plain data: plan, and per argument a tensor's dtype/shape/strides/offset or a scalar's value."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return (str(a.dtype), tuple(a.shape), a.stride(), a.storage_offset())
        return a

    p = launch.plan
    return (p.name, p.grid, tuple(sorted(p.constexprs.items())), p.num_warps, p.num_stages,
            tuple(arg(a) for a in launch.args))


def _mini_script(backend):
    """Prefill, a ragged prefill, batched decode (static path when pooled), a verification beside a decode row."""
    a, b, c = backend.new_cache(), backend.new_cache(), backend.new_cache()
    yield [SequenceStep(a, [5, 17, 3, 44, 9, 1, 2, 3, 4, 5, 6])]
    yield [SequenceStep(b, [1, 2]), SequenceStep(c, [7, 8, 9])]
    yield [SequenceStep(x, [11]) for x in (a, b, c)]
    yield [SequenceStep(a, [12, 13, 14], all_logits=True), SequenceStep(b, [15])]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_recording_on_the_meta_device_sees_the_launches_a_real_run_makes(cuda_graphs):
    """The recorder runs the backend's own code: the same plans and argument layouts as an executed run."""
    c = _config(4, 2)
    w = _weights(c, seed=1)
    runs = []
    for device in ("cpu", "meta"):
        backend = TritonBackend(c, w, dtype="float32", device=device, target=INTERPRETER, cuda_graphs=cuda_graphs,
                                graph_batch_sizes=(1, 4))
        seen = []
        for steps in _mini_script(backend):
            with recording(execute=device == "cpu") as launches:
                out = backend.forward(steps)
            seen += [_describe(x) for x in launches]
            if device == "cpu":
                assert all(np.isfinite(o).all() for o in out)  # the kernels did run
        runs.append(seen)
    assert len(runs[0]) > 40 and runs[0] == runs[1]


@pytest.fixture(scope="module")
def tinyllama_h100():
    return aot.record("tinyllama", "bfloat16", H100)


def _by_label(recorded, suffix):
    return [r.launch for r in recorded if r.label.endswith(suffix)]


def test_tinyllama_bf16_on_h100_takes_the_gpu_choices(tinyllama_h100):
    launches = [r.launch for r in tinyllama_h100]
    assert {x.plan.name for x in launches} == ALL_KERNELS
    for x in launches:
        if x.plan.name in DOT_KERNELS:
            assert x.plan.constexprs["DOT_MODE"] == DOT_NATIVE  # tensor cores; never taken in the interpreter
        tensors = [a for a in x.args if isinstance(a, torch.Tensor)]
        assert all(t.device.type == "meta" for t in tensors)
        assert {t.dtype for t in tensors} <= {torch.bfloat16, torch.float32, torch.int32}

    for b in GRAPH_BATCH_SIZES:  # the static step of every CUDA-graph bucket: B rows through every matmul
        step = _by_label(tinyllama_h100, f"static decode B={b}")
        partial = [x for x in step if x.plan.name == "_decode_partial_kernel"]
        assert len(partial) == 2 and all(x.plan.grid[2] == b and x.plan.constexprs["HAS_SLOTS"] for x in partial)
        rows = {x.args[3] for x in step if x.plan.name in ("_gemv_kernel", "_gemm_kernel")}  # M
        assert rows == {b}

    gemv = [x for x in launches if x.plan.name == "_gemv_kernel"]
    assert {x.plan.grid[1] > 1 for x in gemv} == {True, False}  # split-K (partials + reduce) and whole-K launches
    assert any(x.plan.name == "_splitk_reduce_kernel" for x in launches)
    assert {x.plan.constexprs["BLOCK_M"] for x in launches if x.plan.name == "_gemm_kernel"} == {64, 128}

    verify = [x for x in _by_label(tinyllama_h100, f"static verify {aot.SPECULATE} drafts")
              if x.plan.name == "_prefill_attention_kernel"]
    assert len(verify) == 2 and all(x.args[4] == 1 + aot.SPECULATE and x.args[5] > 0 for x in verify)  # T, start
    logits = [x for x in _by_label(tinyllama_h100, f"static verify {aot.SPECULATE} drafts")
              if x.plan.name in ("_gemv_kernel", "_gemm_kernel") and x.args[4] == 32000]
    assert logits and logits[-1].args[3] == 1 + aot.SPECULATE  # lm_head on every verified row
    eager = [x for x in launches if x.plan.name == "_decode_partial_kernel" and not x.plan.constexprs["HAS_SLOTS"]]
    assert eager  # per-sequence caches (cuda_graphs=False) too


def test_the_target_decides_dot_mode_and_grids(tinyllama_h100):
    """The plans follow the target's facts: the interpreter upcasts bf16 dots, fp32 dots are IEEE everywhere, and
    A100's 108 SMs split the decode matmuls differently from H100's 132."""
    interp = aot.record("tinyllama", "bfloat16", INTERPRETER)
    assert {x.launch.plan.constexprs["DOT_MODE"] for x in interp if x.launch.plan.name in DOT_KERNELS} == {DOT_UPCAST}
    fp32 = aot.record("mqa", "float32", H100)
    assert {x.launch.plan.constexprs["DOT_MODE"] for x in fp32 if x.launch.plan.name in DOT_KERNELS} == {DOT_IEEE}

    def gemv_grids(recorded):
        return {(r.launch.args[4], r.launch.plan.grid) for r in recorded if r.launch.plan.name == "_gemv_kernel"}

    a100 = aot.record("tinyllama", "bfloat16", A100)
    assert {r.label for r in a100} == {r.label for r in tinyllama_h100}
    assert gemv_grids(a100) != gemv_grids(tinyllama_h100)  # (N, (column tiles, K splits)) per matmul


def _aot(*args, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "tinyllama_kernels.aot", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check_sweep(done, path):
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    out = json.loads(path.read_text())
    results = out["results"]
    assert out["launches"] > 10000 and out["specializations"] >= len(results) > 200
    for target in ("sm_80", "sm_90"):
        mine = [r for r in results if r["target"] == target]
        assert {r["kernel"] for r in mine} == ALL_KERNELS
        for r in mine:
            assert r["error"] is None and r["problems"] == []
            assert 0 <= r["shared"] <= aot.SHARED_LIMIT[int(target[3:])]
            if r["kernel"] in aot.HOT_KERNELS:
                assert not r["ptx_local"] and r["spill_stores"] == 0
    labels = {label for r in results for label in r["labels"]}
    for model in aot.MODELS:
        for dtype in aot.DTYPES:
            for b in GRAPH_BATCH_SIZES:
                assert f"{model} {dtype} static decode B={b}" in labels
            assert f"{model} {dtype} static verify {aot.SPECULATE} drafts" in labels
            assert f"{model} {dtype} eager decode B=2" in labels
    for n in aot.PREFILL_LENGTHS:
        assert f"tinyllama bfloat16 static prefill T={n}" in labels
    # TinyLlama bf16 prefill at T=2048 ran the 128x128 tensor-core GEMM
    assert any(r["kernel"] == "_gemm_kernel" and r["constexprs"].get("BLOCK_M") == 128 and r["constexprs"]["DOT_MODE"]
               == DOT_NATIVE and "tinyllama bfloat16 static prefill T=2048" in r["labels"] for r in results)


def test_every_kernel_shape_compiles_for_sm80_and_sm90(tmp_path):
    """One specialization per kernel code shape (block sizes, modes, warps, stages, pointer types) of every launch of
    TinyLlama / MHA / MQA in bf16, fp16 and fp32, compiled to cubin for both targets. Cold: ~90 s on 2 cores; the
    Triton cache makes a rerun take seconds."""
    path = tmp_path / "aot.json"
    _check_sweep(_aot("--representatives", "--jobs", "2", "--json", str(path)), path)


@pytest.mark.slow
def test_every_specialization_compiles_for_sm80_and_sm90(tmp_path):
    """Every distinct specialization the JIT would compile (the integer hints too: ~540, ~7 minutes cold)."""
    path = tmp_path / "aot.json"
    _check_sweep(_aot("--jobs", "2", "--json", str(path)), path)


PLANTED = r"""
import os, sys, json, torch
os.environ["TRITON_INTERPRET"] = "0"
from tinyllama_kernels import aot
from tinyllama_kernels.attention_prefill import _prefill_attention_kernel
from tinyllama_kernels.matmul import _gemm_kernel
from tinyllama_kernels.launch import Launch, LaunchPlan
out = {}
q = torch.empty(300, 4, 128, dtype=torch.float32, device="meta"); k = torch.empty(4, 512, 128, device="meta")
old = LaunchPlan(_prefill_attention_kernel, (5, 4), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, DOT_MODE=1),
                 num_warps=4, num_stages=2)  # fp32 64x64 tiles: what the prefill plan chose before tinyllama_kernels.aot
args = (q, k, k, q, 300, 0, 128, 1, 0.1, *q.stride()[:2], *k.stride()[:2], *k.stride()[:2], *q.stride()[:2])
out["spill"] = aot.compile_one(*aot.specialize(Launch(old, args), 80))
x = torch.empty(256, 2048, dtype=torch.bfloat16, device="meta")
w = torch.empty(4096, 2048, dtype=torch.bfloat16, device="meta")
huge = LaunchPlan(_gemm_kernel, (1,), dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, DOT_MODE=0),
                  num_warps=8, num_stages=4)
y = torch.empty(256, 4096, dtype=torch.bfloat16, device="meta")
gargs = (x, w, y, 256, 4096, 2048, 2048, 1, 2048, 1, 4096, 1)
out["shared"] = aot.compile_one(*aot.specialize(Launch(huge, gargs), 90))
print(json.dumps(out))
"""


def test_the_checks_catch_a_spilling_kernel_and_too_much_shared_memory():
    done = subprocess.run([sys.executable, "-c", PLANTED], cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    spill = out["spill"]
    assert spill["error"] is None and spill["spill_stores"] > 1000
    assert any("register spills" in p for p in spill["problems"])
    shared = out["shared"]
    assert shared["error"] is None and shared["shared"] > aot.SHARED_LIMIT[90]
    assert any("shared memory" in p for p in shared["problems"])


def test_problems_names_each_failure():
    ok = {"kernel": "_gemm_kernel", "target": "sm_80", "error": None, "shared": 1000, "ptx_local": False,
          "spill_stores": 0, "spill_loads": 0, "registers": 100}
    assert aot.problems(ok) == []
    assert "does not compile" in aot.problems(dict(ok, error="CompilationError: boom"))[0]
    assert "shared memory" in aot.problems(dict(ok, shared=aot.SHARED_LIMIT[80] + 1))[0]
    assert aot.problems(dict(ok, target="sm_90", shared=aot.SHARED_LIMIT[80] + 1)) == []
    assert ".local" in aot.problems(dict(ok, ptx_local=True))[0]
    assert "spills" in aot.problems(dict(ok, spill_stores=4, spill_loads=4))[0]
    assert aot.problems(dict(ok, kernel="_rms_norm_kernel", ptx_local=True)) == []  # not a hot kernel


def test_aot_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "tinyllama_kernels.aot"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
