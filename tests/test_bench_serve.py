"""`python -m bench.serve` (the server's load benchmark) end to end in quick mode on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("httpx")


def bench_serve(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_run_reports_throughput_ttft_errors_and_rss(tiny_chat_model, tmp_path):
    r = bench_serve("--quick", "--model", str(tiny_chat_model), "--clients", "3", "--duration", "1",
                    "--warmup", "0.3", "--out", str(tmp_path), "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["in_process"]) == 2  # before and after the server's rounds
    assert all(r["tok_s"] > 0 and r["tokens"] > 0 for r in results["in_process"])
    assert len(results["rounds"]) == 3 and results["server_exit_status"] == 0
    for round_ in results["rounds"]:
        assert round_["errors"] == 0 and round_["completed"] >= 1 and round_["tok_s"] > 0
        assert 0 < round_["ttft_p50_s"] <= round_["ttft_p95_s"] < 60
        assert round_["rss_after_bytes"] > 20e6
    assert results["rss_start_bytes"] > 20e6
    summary = results["summary"]
    assert summary["errors"] == 0 and abs(summary["rss_growth"]) < 1
    base = (results["in_process"][0]["tok_s"] + results["in_process"][1]["tok_s"]) / 2
    assert summary["in_process_tok_s"] == pytest.approx(base)
    assert summary["ratio"] == pytest.approx(sum(r["tok_s"] for r in results["rounds"]) / 3 / base)
    assert summary["rss_growth"] == pytest.approx(results["rounds"][2]["rss_after_bytes"]
                                                  / results["rounds"][0]["rss_after_bytes"] - 1)
    for text in ("in-process Scheduler (batch 3)", "TTFT p50", "server / in-process", "RSS"):
        assert text in r.stdout


def test_bad_arguments_exit_2():
    r = bench_serve("--clients", "0", timeout=60)
    assert r.returncode == 2 and "--clients" in r.stderr


def test_multi_turn_mode_compares_the_prefix_cache_on_and_off(tiny_chat_model, tmp_path):
    r = bench_serve("--model", str(tiny_chat_model), "--conversations", "2", "--turns", "3", "--reply-tokens", "6",
                    "--system-words", "30", "--user-words", "8", "--threads", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    on, off = results["cache_on"], results["cache_off"]
    assert on["errors"] == off["errors"] == 0 and on["tokens"] == off["tokens"] == 2 * 3 * 6
    assert [t["cached_tokens"] for t in off["per_turn"]] == [0, 0, 0]
    assert on["per_turn"][2]["cached_tokens"] > on["per_turn"][1]["cached_tokens"] > 0  # the history, re-used
    prompts = sum(t["prompt_tokens"] for t in on["per_turn"]) * 2
    assert off["counters"]["tinyllama_prompt_tokens_prefilled_total"] == prompts
    assert (on["counters"]["tinyllama_prompt_tokens_prefilled_total"]
            + on["counters"]["tinyllama_prompt_tokens_cached_total"]) == prompts
    n = results["n_choices"]
    assert n["choices"] == 4 and n["prefilled_tokens"] == n["prompt_tokens"]  # four choices, one prefill
    for text in ("TTFT on", "TTFT off", "aggregate:", "n=4: 4 choices"):
        assert text in r.stdout


def test_a_cluster_bench_interrupted_while_its_cluster_starts_stops_the_server(monkeypatch):
    """Ctrl-C while `tinyllama serve --replicas` is still starting used to leave it (and its Ray instance) running."""
    import bench.serve
    import bench.serve_cluster

    started, real_popen = [], subprocess.Popen

    def popen(cmd, **kw):  # the server's place taken by a process that only waits
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw))
        return started[-1]

    def interrupted(self, timeout=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.serve.subprocess, "Popen", popen)
    monkeypatch.setattr(bench.serve.Server, "wait_ready", interrupted)
    args = bench.serve_cluster.parse_args(["--model", "m"])
    args.threads = 1
    with pytest.raises(KeyboardInterrupt):
        bench.serve_cluster.ClusterServer(args, 2, "prefix")
    assert len(started) == 1 and started[0].poll() is not None
