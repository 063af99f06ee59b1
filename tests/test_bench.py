"""`tinyllama bench`: the quick run end to end (results.json, plots, table) and one-line user errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("system", "backend", "dtype", "batch", "prompt_tokens", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
            "load_s", "ttft_s", "prefill_tok_s_min", "prefill_tok_s_max", "decode_tok_s_min", "decode_tok_s_max")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "engine", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench") / "out"
    r = bench("--quick", "--rounds", "2", "--out", str(out))  # two rounds: the merge runs end to end
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, json.loads((out / "results.json").read_text())


def test_quick_results_json(quick_run):
    _, _, results = quick_run
    rows = results["rows"]
    # The random checkpoint is bf16 (as TinyLlama ships): the engine keeps it 16-bit, transformers fp32 upcasts it.
    for system, backend, dtype in (("tinyllama-engine", "numpy", "bfloat16"), ("transformers", "torch-sdpa", "float32")):
        mine = [r for r in rows if r["system"] == system and r["backend"] == backend and r["dtype"] == dtype
                and r["kind"] in ("prefill", "decode")]
        assert {r["kind"] for r in mine} == {"prefill", "decode"}, (system, mine)
        long = [r for r in rows if r["system"] == system and r["kind"] == "long_context"]
        assert len(long) == 1 and long[0]["context_tokens"] == results["settings"]["long_context"]
        assert long[0]["decode_tok_s"] > 0 and long[0]["prefill_added_bytes"] >= 0
        for r in mine:
            assert r["status"] == "ok"
            for key in REQUIRED:
                assert key in r, (system, key)
            assert r["peak_rss_bytes"] > 50e6 and r["load_s"] > 0 and r["batch"] >= 1 and r["prompt_tokens"] >= 1
            measured = "prefill_tok_s" if r["kind"] == "prefill" else "decode_tok_s"
            assert 0 < r[f"{measured}_min"] <= r[measured] <= r[f"{measured}_max"] < 1e7
            if r["kind"] == "prefill":
                assert 0 < r["ttft_s"] < 60
        assert sorted(r["batch"] for r in mine if r["kind"] == "decode") == results["settings"]["batches"]
    assert {r["system"] for r in rows} == {"tinyllama-engine", "transformers"}  # --quick: these two only
    engine_rows = [r for r in rows if r["system"] == "tinyllama-engine"]
    assert all(r["blas_kernel"] == engine_rows[0]["blas_kernel"] for r in engine_rows)
    spec = [r for r in engine_rows if r["kind"] == "speculative"]  # the engine's prompt-lookup row (greedy-checked)
    assert len(spec) == 1 and spec[0]["decode_tok_s"] > 0 and spec[0]["plain_decode_tok_s"] > 0
    assert 0 <= spec[0]["acceptance_rate"] <= 1 and spec[0]["speedup"] == pytest.approx(
        spec[0]["decode_tok_s"] / spec[0]["plain_decode_tok_s"])
    assert 0 < spec[0]["step_s"] < 60 and 0 < spec[0]["verify_step_s"] < 60  # the cost of a step of drafts


def test_quick_machine_block(quick_run):
    _, _, results = quick_run
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["cpu"]
    assert machine["blas"]["library"] and machine["blas_kernel"] == machine["blas"]["kernel"]
    assert machine["blas_kernel"]  # the OpenBLAS kernel actually used, e.g. SkylakeX
    assert "OPENBLAS_CORETYPE" in machine and "gpu" in machine
    roof = machine["roofline"]
    assert roof["read_gbs"] > 0.5 and roof["matmul_gflops"] > 0.5
    model = results["model"]  # the quick model is untied: its embedding table is not read per decoded token
    assert roof["fp32_decode_bytes"] == roof["fp32_weight_bytes"] - 4 * model["vocab_size"] * model["hidden_size"]
    assert roof["decode_floor_fp32_tok_s"] == pytest.approx(roof["read_gbs"] * 1e9 / roof["fp32_decode_bytes"])
    busy = machine["cpu_busy"]  # other processes' busy cores, from /proc/stat (None where there is none)
    if Path("/proc/stat").exists():
        assert busy["others_before"] >= 0 and busy["others_during"] >= 0
    b1 = [r for r in results["rows"] if r.get("kind") == "decode" and r["batch"] == 1]
    assert b1 and all(r["pct_of_floor"] > 0 and r["read_gbs_now"] > 0.5 for r in b1)
    assert len(machine["roofline_rounds"]) == 2  # a roofline per round


def test_quick_rounds_are_merged(quick_run):
    """--rounds 2: each figure is the median over both rounds' (two values: their mean), bounds over every run."""
    _, _, results = quick_run
    for r in (r for r in results["rows"] if r["kind"] in ("prefill", "decode")):
        key = "prefill_tok_s" if r["kind"] == "prefill" else "decode_tok_s"
        per_round = r["rounds"][key]
        assert len(per_round) == 2 and r[key] == pytest.approx(sum(per_round) / 2)
        assert r[f"{key}_min"] <= min(per_round) and r[f"{key}_max"] >= max(per_round)
    labels = [(r["label"], r["kind"], r["batch"], r["prompt_tokens"]) for r in results["rows"]]
    assert len(labels) == len(set(labels))  # one row per figure, not one per round


def test_quick_plots_and_table(quick_run):
    out, run, _ = quick_run
    import matplotlib.image

    for name in ("decode_vs_batch.png", "prefill_vs_prompt.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
    for text in ("engine-numpy", "transformers-fp32", "roofline", "Decode", "Prefill", "results.json"):
        assert text in run.stdout
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--prompt-len", ""], "--prompt-len"),
    (["--backend", "cuda"], "--backend"),
    (["--systems", "vllm"], "--systems"),
    (["--model", "/nonexistent/model-folder"], "no such model folder"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    r = bench(*args, "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and "Traceback" not in r.stderr


def test_list_parsing():
    from bench.cli import int_list
    from engine.errors import EngineError

    assert int_list("1, 8,32,8", "--batch") == [1, 8, 32]
    for bad in ("", "1,,2", "-1", "1.5", "a"):
        with pytest.raises(EngineError):
            int_list(bad, "--batch")


def test_cli_module_is_light():
    code = ("import sys, bench.cli; import argparse; bench.cli.add_bench_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
