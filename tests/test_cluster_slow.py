"""The cluster's long checks (marked slow; tests/test_cluster.py is the default suite's): a replica killed with
kill -9 under 16 clients, autoscaling 1 -> 2 -> 1 under a sustained queue, prefix affinity against Ray Serve's
default router on 8 conversations x 6 turns, and an existing Ray cluster (--ray-address, and `serve run` with the
config file of docs/cluster.yaml). Every Ray instance is started and stopped here, on 127.0.0.1. No timing is
asserted beyond generous bounds that tell a hang from a slow machine; the measured times are printed (-s)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.cluster_support import ClusterProcess  # noqa: E402
from tests.conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow
ONE_THREAD = {"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
HANG = 120  # seconds after which a request is taken as hung (the goal is an answer within 5 s of a failure)


def cluster_metrics(url: str) -> dict:
    """The cluster's /metrics: {(name, ((label, value), ...)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def replicas_up(url: str) -> int:
    m = cluster_metrics(url)
    return int(sum(v for (name, _), v in m.items() if name == "tinyllama_cluster_replica_up"))


def wait_for(condition, timeout: float, what: str) -> float:
    """Poll `condition` until true -> the seconds it took; AssertionError naming `what` past `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(1)
    return time.monotonic() - started


async def stream_one(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion -> {start, end, status, replica, tokens (generated, from the usage chunk),
    error_code}; error_code: an HTTP error's or a
    stream error event's OpenAI code, 'hang' past HANG seconds, or the exception's name."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"start": time.monotonic(), "status": None, "replica": None, "tokens": 0, "error_code": None}
    try:
        async with asyncio.timeout(HANG):
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                out["status"], out["replica"] = r.status_code, r.headers.get("x-tinyllama-replica")
                if r.status_code != 200:
                    out["error_code"] = json.loads(await r.aread())["error"]["code"]
                else:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                out["error_code"] = chunk["error"]["code"]
                            elif chunk.get("usage"):
                                out["tokens"] = chunk["usage"]["completion_tokens"]
    except TimeoutError:
        out["error_code"] = "hang"
    except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
        out["error_code"] = type(e).__name__
    out["end"] = time.monotonic()
    return out


async def load(url: str, clients: int, seconds: float, max_tokens: int, during=None) -> list[dict]:
    """`clients` closed-loop streaming clients for up to `seconds`; `during(elapsed)` is awaited once a second, and
    when it returns True the clients stop (each after its request in flight)."""
    results: list[dict] = []
    end = [time.monotonic() + seconds]
    async with httpx.AsyncClient(timeout=httpx.Timeout(HANG, connect=30)) as client:
        async def loop(i):
            n = 0
            while time.monotonic() < end[0]:
                results.append(await stream_one(client, url, f"Client {i} story {n}: once upon a time", max_tokens))
                n += 1

        async def watch():
            started = time.monotonic()
            while time.monotonic() < end[0]:
                await asyncio.sleep(1)
                if during is not None and await during(time.monotonic() - started):
                    end[0] = time.monotonic()

        await asyncio.gather(watch(), *(loop(i) for i in range(clients)))
    return results


# ---- failover ------------------------------------------------------------------------------------------------------
def test_a_replica_killed_under_load_fails_only_its_own_requests_fast_and_is_replaced(stories260k):
    server = ClusterProcess("--model", str(stories260k), "--shutdown-timeout", "5", replicas=2, env=ONE_THREAD)
    try:
        server.wait_ready()
        killed = {}

        async def kill_one(elapsed):
            if elapsed >= 20 and not killed:
                victim = server.replicas()[0]
                killed["at"] = time.monotonic()
                victim.kill()  # kill -9 the replica's worker process
            return False

        results = asyncio.run(load(server.url, clients=16, seconds=60, max_tokens=200, during=kill_one))
        full_again = wait_for(lambda: replicas_up(server.url) == 2 and cluster_metrics(server.url)[
            ("tinyllama_cluster_replicas", ())] == 2, 600, "2 replicas again") + time.monotonic() - killed["at"]
        at = killed["at"]
        before = {r["replica"] for r in results if r["end"] < at and r["replica"]}
        after = {r["replica"] for r in results if r["start"] > at + 10 and r["replica"]}
        dead = before - after
        failed = [r for r in results if r["error_code"] is not None]
        print(f"\n{len(results)} requests, {len(failed)} failed ({sorted({r['error_code'] for r in failed})}); "
              f"each failed {max((r['end'] - max(r['start'], at) for r in failed), default=0):.2f} s after the kill "
              f"(or its own start) at most; "
              f"2 replicas again {full_again:.0f} s after the kill")
        assert len(dead) == 1 and failed
        assert all(r["error_code"] == "replica_failed" for r in failed), failed  # a 503 (or its SSE event): no hang
        assert all(r["replica"] in (None, *dead) for r in failed)  # no request of the other replica failed
        assert len([r for r in results if r["error_code"] is None and r["tokens"] == 200]) > len(failed)
        m = cluster_metrics(server.url)
        for replica in after:  # the survivor and the new replica: nothing cancelled, no error
            assert m.get(("tinyllama_requests_finished_total", (("finish_reason", "abort"), ("replica", replica))),
                         0) == 0
            assert not any(name == "tinyllama_request_errors_total" and dict(labels).get("replica") == replica
                           and value for (name, labels), value in m.items())
        assert server.interrupt() == 0 and server.leftovers() == []
    finally:
        server.stop()


# ---- autoscaling ---------------------------------------------------------------------------------------------------
def test_autoscaling_adds_a_replica_under_a_sustained_queue_and_removes_it_when_idle(stories260k):
    server = ClusterProcess("--model", str(stories260k), "--max-replicas", "2", "--max-active", "4",
                            "--target-ongoing-requests", "2", "--upscale-delay", "1", "--downscale-delay", "5",
                            "--shutdown-timeout", "60", replicas=1, env=ONE_THREAD)
    try:
        server.wait_ready()
        wait_for(lambda: replicas_up(server.url) == 1, 120, "the first replica's metrics")
        seen: dict = {}

        async def until_two(elapsed):  # then 15 s more, so that the new replica takes requests
            if "two" not in seen and await asyncio.to_thread(replicas_up, server.url) == 2:
                seen["two"] = elapsed
            return "two" in seen and elapsed > seen["two"] + 15

        busy = asyncio.run(load(server.url, clients=8, seconds=300, max_tokens=300, during=until_two))
        assert "two" in seen, "no second replica under 8 clients for 300 s"
        served_by = {r["replica"] for r in busy if r["replica"]}
        # one client keeps streaming while the autoscaler goes back to 1: the replica removed finishes its streams
        down: dict = {}

        async def until_one(elapsed):
            if "one" not in down and await asyncio.to_thread(replicas_up, server.url) == 1:
                down["one"] = elapsed
            return "one" in down and elapsed > down["one"] + 5

        quiet = asyncio.run(load(server.url, clients=1, seconds=300, max_tokens=300, during=until_one))
        print(f"\nscaled to 2 after {seen['two']:.0f} s of load; back to 1 after {down.get('one', -1):.0f} s of a "
              f"single client; {len(busy) + len(quiet)} requests")
        assert "one" in down, "still 2 replicas after 300 s of a single client"
        assert len(served_by) == 2  # both replicas served
        failed = [r for r in busy + quiet if r["error_code"] is not None or r["tokens"] != 300]
        assert failed == []
        assert server.interrupt() == 0 and server.leftovers() == []
    finally:
        server.stop()


# ---- routing -------------------------------------------------------------------------------------------------------
def test_prefix_affinity_keeps_90_percent_of_later_turns_on_their_cache_and_beats_the_default_router(stories260k,
                                                                                                    tmp_path):
    """bench.serve_cluster on 2 replicas: 8 conversations x 6 turns (completions: stories260K has no chat template),
    with the prefix-affinity router, then Ray Serve's power of two choices."""
    r = subprocess.run([sys.executable, "-m", "bench.serve_cluster", "--model", str(stories260k), "--configs",
                        "2:prefix,2:pow2", "--conversations", "8", "--turns", "6", "--api", "completions",
                        "--system-words", "10", "--user-words", "4", "--reply-tokens", "16", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=1800, env={**os.environ, **ONE_THREAD})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print("\n" + r.stdout)
    prefix, pow2 = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert prefix["errors"] == pow2["errors"] == 0
    assert prefix["cached_share"] >= 0.9 and prefix["replica_switches"] == 0
    assert prefix["counters"]["router_affinity"] >= 0.9 * 8 * 5
    assert prefix["cached_token_share"] > pow2["cached_token_share"]


# ---- an existing cluster -------------------------------------------------------------------------------------------
RAY_HELPER = """
import shutil, sys, tempfile
from engine.serve.cluster.local import start_local_ray
folder = tempfile.mkdtemp(prefix="tlray-")
start_local_ray(2, folder)
import ray
print("ADDRESS", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.shutdown()
shutil.rmtree(folder, ignore_errors=True)
"""


def test_an_existing_ray_cluster_with_the_flag_and_with_the_config_file(stories260k, tmp_path):
    helper = subprocess.Popen([sys.executable, "-c", RAY_HELPER], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # Ray turns token authentication on for a new local cluster when a token exists in ~/.ray; its clients then
    # need RAY_AUTH_MODE=token to present it
    auth = "token" if (Path.home() / ".ray" / "auth_token").exists() else "disabled"
    env = {**os.environ, **ONE_THREAD, "RAY_AUTH_MODE": auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        line = helper.stdout.readline()
        address = re.match(r"ADDRESS (\S+)", line).group(1)
        # stories260K has no chat template of its own: --chat-template must reach the replica (and the router)
        server = ClusterProcess("--model", str(stories260k), "--ray-address", address, "--chat-template", "chatml",
                                replicas=1, env=env)
        try:
            server.wait_ready()
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6},
                           timeout=120)
            assert r.status_code == 200 and r.headers["x-tinyllama-replica"]
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True})
            assert r.status_code == 200, r.text
            assert server.interrupt() == 0  # the application is deleted; the cluster stays up
        finally:
            server.stop()
        config = (REPO / "docs" / "cluster.yaml").read_text()
        config = config.replace("TinyLlama/TinyLlama-1.1B-Chat-v1.0", str(stories260k))
        config = re.sub(r"threads: \d+", "threads: 1", re.sub(r"max_replicas: \d+", "max_replicas: 1", config))
        path = tmp_path / "cluster.yaml"
        path.write_text(config)
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        run = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(path), "--address", address],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Ray Serve keeps the HTTP address it was first started with on a cluster (the flag's run above)
            url = server.url
            wait_for(lambda: _answers(url), 600, "serve run's application")
            r = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 6,
                                                          "temperature": 0}, timeout=120)
            assert r.status_code == 200 and r.json()["model"] == str(stories260k)
        finally:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(120)
            except subprocess.TimeoutExpired:
                run.kill()
            os.unlink(log.name)
    finally:
        helper.stdin.close()
        helper.wait(120)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
