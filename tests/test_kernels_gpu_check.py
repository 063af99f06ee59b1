"""bench.gpu_check: imports cleanly, says so in one line and exits 1 without a CUDA GPU; its measuring helpers run
(on CPU: a tiny random checkpoint, the Triton interpreter, transformers on the CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_imports_without_torch_side_effects():
    code = "import os, bench.gpu_check as g; assert callable(g.main); print(os.environ.get('TRITON_INTERPRET'))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"  # importing set nothing up (no torch/triton/kernels import at module level)


def test_gpu_check_without_cuda_prints_one_line_and_exits_1(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU: the same answer on a GPU machine
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not list(tmp_path.iterdir())


def test_gpu_check_helpers_on_a_tiny_model(tmp_path, monkeypatch):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    from tinyllama_kernels._common import interpreting

    if not interpreting():
        pytest.skip("runs the helpers in the interpreter only")
    import engine
    from bench import gpu_check
    from tests.conftest import make_random_checkpoint

    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    folder = make_random_checkpoint(tmp_path / "tiny", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, seed=3)
    model = engine.load_model(str(folder), backend="triton", dtype="float32")
    backend = model.backend

    corr = gpu_check.correctness(model, folder, prompt_len=5, n_greedy=3)
    assert corr["max_abs_diff_vs_hf_fp32"] < 1e-3  # fp32 here: transformers and the kernels agree closely
    assert corr["greedy_teacher_forced_agreement"] == 1.0 and len(corr["ours_greedy"]) == 3

    d = gpu_check.decode_rate(backend, batch=2, prompt_len=3, steps=1, warmup=1)
    assert d["tok_per_s_aggregate"] > 0 and backend.stats["static_steps"] >= 2
    pf = gpu_check.prefill_rate(backend, 6, trials=1)
    assert pf["flops"] > 2 * gpu_check.matmul_params(backend.config) * 6 > 0

    c = backend.config
    assert gpu_check.weight_bytes(backend) == 4 * sum(int(np.prod(t.shape)) for t in
                                                      [backend.lm_head, backend.final_norm] +
                                                      [w for layer in backend.layers for w in vars(layer).values()])
    # one layer, one head, head_dim 1, 2 tokens: 3 query-key pairs, 2 * 2 flops each
    one = type(c)(**{**vars(c), "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 1})
    assert gpu_check.attention_flops(one, 2) == 12

    ref = gpu_check.hf_model(folder, "float32")
    assert gpu_check.hf_decode_rate(ref, prompt_len=3, steps=2, warmup=1)["tok_per_s_per_sequence"] > 0
    assert gpu_check.hf_prefill_rate(ref, 4, trials=1)["best_s"] > 0
    assert isinstance(torch.__version__, str)


def test_gpu_check_plan_prints_the_targets_without_a_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plan"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for needle in ("H100", "A100", "3.35 TB/s", "2.0 TB/s", "_gemv_kernel", "_decode_partial_kernel",
                   "decode B=1: floor", "decode B=32: floor", "prefill 2048"):
        assert needle in out, needle


def test_gpu_plan_figures_follow_from_the_model_and_the_datasheets():
    """Checked against counts made here from the config's tensor shapes, not from the plan's own formulas."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import tests.kernel_support  # noqa: F401  (the interpreter, as for every kernel test)
    from bench.checkpoints import TINYLLAMA_SHAPE
    from bench.gpu_plan import plan
    from engine.config import ModelConfig

    shape = dict(TINYLLAMA_SHAPE, head_dim=TINYLLAMA_SHAPE["hidden_size"] // TINYLLAMA_SHAPE["num_attention_heads"])
    c = ModelConfig(**shape)
    shapes = c.tensor_shapes()
    matrices = sum(int(np.prod(s)) for name, s in shapes.items()
                   if len(s) == 2 and name != "model.embed_tokens.weight")  # layer matrices and lm_head
    layer_matrices = matrices - c.vocab_size * c.hidden_size
    kv_per_seq = c.num_hidden_layers * 2 * c.num_key_value_heads * 256 * c.head_dim * 2  # bf16 K and V, 256 positions

    p = plan(256)
    assert [g["gpu"].split()[0] for g in p["gpus"]] == ["H100", "A100"]
    for g in p["gpus"]:
        bw = g["hbm_tb_s"] * 1e12
        one, many = g["decode"]
        assert (one["batch"], many["batch"]) == (1, 32)
        assert one["launches"]["_gemv_kernel"] == 4 * c.num_hidden_layers + 1  # qkv, o, gate_up, down; lm_head
        assert many["launches"]["_gemm_kernel"] == 4 * c.num_hidden_layers + 1  # 32 rows: the tiled GEMM
        weights = 2 * matrices
        matmul = one["bytes"]["_gemv_kernel"]
        assert weights < matmul < 1.01 * weights  # every matrix once, plus the activations
        assert weights <= one["total_bytes"] < 1.03 * weights
        assert many["bytes"]["_decode_partial_kernel"] > 32 * kv_per_seq
        assert many["total_bytes"] > weights + 32 * kv_per_seq
        for step in (one, many):
            assert step["tok_per_s"] == pytest.approx(step["batch"] * bw / step["total_bytes"])  # memory-bound
        for f in g["prefill"]:
            t = f["tokens"]
            flops = 2 * t * layer_matrices + 2 * c.vocab_size * c.hidden_size + \
                4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * t * (t + 1) // 2
            assert f["flops"] == flops
            assert f["tok_per_s"] == pytest.approx(t * g["bf16_tflop_s"] * 1e12 / flops)
    h100, a100 = p["gpus"]
    assert 1500 < h100["decode"][0]["tok_per_s"] < 3.35e12 / (2 * matrices)  # below the weights-only bound
    assert a100["decode"][0]["tok_per_s"] == pytest.approx(h100["decode"][0]["tok_per_s"] * 2.0 / 3.35, rel=0.01)
