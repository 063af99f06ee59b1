"""`tinyllama serve --replicas 2` end to end (the default suite's cluster test): a local Ray instance on 127.0.0.1
started by the server, two replicas of a small model, one thread each. The single server's OpenAI-client checks
(tests/test_serve.py) run unchanged against the cluster; then what only a cluster does: both replicas serve, a
conversation stays on the replica holding its prefix, a seeded request (n choices, structured output included)
gives the single server's text, /metrics merges the replicas, and Ctrl-C leaves no process behind.

The longer checks (failover under load, autoscaling, the routing comparison, an existing Ray cluster) are in
tests/test_cluster_slow.py, marked slow."""
from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from tests.cluster_support import ClusterProcess, listening_addresses  # noqa: E402
from tests.serve_support import ServerProcess  # noqa: E402
from tests.test_serve import (API_KEY, AUTH, MESSAGES, NAME, ONE_THREAD, chat_model, client, model,  # noqa: E402,F401
                              test_chat_greedy_equals_model_complete, test_chat_logprobs_are_the_log_softmax_of_model_logits,
                              test_completion_greedy_equals_model_complete, test_completion_logprobs,
                              test_continuous_usage_stats, test_models_and_health, test_sampling_fields_reach_the_engine,
                              test_seeded_sampling_alone_and_in_a_busy_batch, test_sse_wire_format, test_stop_strings,
                              test_streamed_text_equals_non_streamed, test_the_openai_client_sees_the_errors,
                              test_api_key, test_unknown_fields_are_ignored_and_content_type_is_not_required,
                              test_a_body_that_is_not_a_json_object_is_400)

REPLICA = "x-tinyllama-replica"
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def server(chat_model):
    """The cluster: 2 replicas, each with the single server's flags (named model, API key), one thread each."""
    s = ClusterProcess("--model", str(chat_model), "--served-model-name", NAME, "--api-key", API_KEY,
                       "--shutdown-timeout", "30", replicas=2, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def single(chat_model):
    """`tinyllama serve` alone on the same model and flags: the answers the cluster must give."""
    s = ServerProcess("--model", str(chat_model), "--served-model-name", NAME, "--api-key", API_KEY, env=ONE_THREAD)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_every_answer_names_its_replica_and_both_replicas_serve(server):
    seen = set()
    for i in range(40):
        r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=120,
                       json={"prompt": f"Fresh story number {i}:", "max_tokens": 2})
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA])
        if len(seen) == 2:
            break
    assert len(seen) == 2  # new prompts (no prefix held anywhere) go to the least loaded replica, ties at random


def test_a_conversation_stays_on_the_replica_holding_its_prefix(server):
    """4 conversations at once, 4 turns each: every later turn reaches the replica that served the turn before, and
    its prompt comes partly from that replica's prefix cache."""
    async def conversation(ac, i):
        messages = [{"role": "system", "content": f"You are assistant number {i}; you answer in one line."}]
        turns = []
        for turn in range(4):
            messages.append({"role": "user", "content": f"Question {turn} of conversation {i}: why is the sky blue?"})
            raw = await ac.chat.completions.with_raw_response.create(model=NAME, messages=messages, max_tokens=12,
                                                                    temperature=0)
            r = raw.parse()
            turns.append((raw.headers[REPLICA], r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens))
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
        return turns

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as ac:
            return await asyncio.gather(*(conversation(ac, i) for i in range(4)))

    for turns in asyncio.run(run_all()):
        replicas = {replica for replica, _, _ in turns}
        assert len(replicas) == 1, turns
        assert turns[0][1] == 0 and all(cached > 0 for _, cached, _ in turns[1:]), turns
        assert all(cached >= previous_prompt - 16 for (_, cached, _), (_, _, previous_prompt) in
                   zip(turns[1:], turns)), turns  # the whole history but its last partial block


def test_a_seeded_request_gives_the_single_servers_text(server, single):
    cluster, alone = oai(server), oai(single)
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=77)
    assert cluster.chat.completions.create(**kw).choices[0].message.content == \
        alone.chat.completions.create(**kw).choices[0].message.content
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=30, temperature=0.9, top_p=0.95, seed=5)
    assert cluster.completions.create(**kw).choices[0].text == alone.completions.create(**kw).choices[0].text


def test_n_choices_and_structured_output_are_the_single_servers(server, single):
    cluster, alone = oai(server), oai(single)
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=9, n=3)
    got = [c.message.content for c in cluster.chat.completions.create(**kw).choices]
    assert got == [c.message.content for c in alone.chat.completions.create(**kw).choices] and len(set(got)) == 3
    kw = dict(model=NAME, messages=[{"role": "user", "content": "A colour, as JSON?"}], max_tokens=40,
              temperature=1.0, seed=3,
              response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": SCHEMA}})
    text = cluster.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == alone.chat.completions.create(**kw).choices[0].message.content


def test_metrics_merge_the_replicas(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        out = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=60).text):
            for s in family.samples:
                out.setdefault(s.name, []).append(s)
        return out

    httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=120, json={"prompt": "Counted:", "max_tokens": 3})
    for _ in range(60):  # each replica reports its metrics every 2 s
        m = samples()
        up = [s for s in m.get("tinyllama_cluster_replica_up", []) if s.value == 1]
        if len(up) == 2 and m.get("tinyllama_generation_tokens_total"):
            break
        asyncio.run(asyncio.sleep(1))
    assert m["tinyllama_cluster_replicas"][0].value == 2 and len(up) == 2
    replicas = {s.labels["replica"] for s in m["tinyllama_generation_tokens_total"]}
    assert replicas == {s.labels["replica"] for s in up}
    assert sum(s.value for s in m["tinyllama_generation_tokens_total"]) > 0
    assert {s.labels["decision"] for s in m["tinyllama_router_decisions_total"]} == {"affinity", "load", "new"}


def test_bench_serve_url_runs_the_multi_turn_workload_against_the_cluster(server, tmp_path):
    """`python -m bench.serve --url` (the issue's cluster benchmark) on the running cluster: 3 conversations x 3
    turns; every later turn stays on its replica and reads part of its prompt from that replica's cache."""
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-m", "bench.serve", "--url", server.url, "--api-key", API_KEY,
                        "--conversations", "3", "--turns", "3", "--reply-tokens", "4", "--system-words", "30",
                        "--user-words", "8", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = json.loads((tmp_path / "results.json").read_text())["run"]
    assert run["errors"] == 0 and run["cached_share"] == 1.0 and run["replica_switches"] == 0
    assert run["counters"]["router_affinity"] >= 6 and run["counters"]["router_new"] >= 3
    assert "turns 2-3 with cached_tokens > 0: 100%" in r.stdout


def test_ray_listens_on_the_loopback_only(server):
    addresses = listening_addresses(server.tree)  # GCS, raylet, agents, workers, replicas, Ray Serve's proxy

    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback

    assert addresses and all(loopback(a) for a in addresses), addresses


def test_zz_ctrl_c_drains_finishes_the_stream_in_flight_and_leaves_no_process(server):
    """Last: stops the module's cluster. After Ctrl-C, /health and new requests answer 503 while a stream running
    when it came ends normally; the server exits 0, and no process of the local Ray instance, nor its folder, is
    left."""
    temp_dir = server.temp_dir
    assert temp_dir is not None and temp_dir.is_dir()
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        server.track()
        server.process.send_signal(2)  # SIGINT, mid-stream
        for _ in range(300):
            health = httpx.get(server.url + "/health", timeout=60)
            if health.status_code == 503:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert health.status_code == 503 and health.json() == {"status": "shutting down"}
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=AUTH, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["message"] == "the server is shutting down"
        events += [line for line in lines if line.startswith("data: ")]
    assert server.process.wait(300) == 0, server.log[-3000:]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 1500
    assert server.leftovers() == []
    assert not temp_dir.exists()
