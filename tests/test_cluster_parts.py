"""The cluster's parts that run without Ray (engine.serve.cluster): the routing keys against the real prefix cache, the
affinity decision, an app run in-process by AppHost as a replica runs it, the ingress's failure contract, the merged
/metrics, and the settings (config file and CLI flags)."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.runtime.batch import SequenceStep
from engine.runtime.prefix_cache import PREFIX_BLOCK_TOKENS, PrefixCache
from engine.serve import create_app
from engine.serve.cluster.affinity import AFFINITY, LOAD, NEW, AffinityTable, choose
from engine.serve.cluster.cluster_metrics import ClusterMetrics
from engine.serve.cluster.forwarding import AppHost, ForwardedRequest
from engine.serve.cluster.ingress import REPLICA_FAILED, Failure, IngressApp
from engine.serve.cluster.routing import block_digests, prompt_ids, tokenizer_model
from engine.serve.cluster.settings import ClusterSettings
from engine.serve.metrics import ServerMetrics

httpx = pytest.importorskip("httpx")
B = PREFIX_BLOCK_TOKENS


# ---- routing keys: exactly the prefix cache's blocks -----------------------------------------------------------------
def test_shared_digests_are_exactly_the_blocks_the_prefix_cache_restores(stories260k):
    """Store one prompt's KV in a real PrefixCache; for prompts that share more or less of it, the cache restores
    exactly as many tokens as the two prompts share leading digests (x block size)."""
    model = engine.load_model(str(stories260k))
    rng = np.random.default_rng(0)
    stored = [1] + rng.integers(3, 500, size=5 * B + 6).tolist()
    pool = PrefixCache.for_model(model, 64 * 2 ** 20)
    cache = model.new_cache()
    model.forward([SequenceStep(cache, stored)])
    pool.store(cache, stored)
    for shared in (1, 5, B, B + 3, 3 * B, 5 * B + 7):
        other = stored[:shared] + [2] * (4 * B)  # the same first `shared` tokens, then different ones
        common = 0
        for a, b in zip(block_digests(stored), block_digests(other)):
            if a != b:
                break
            common += 1
        assert pool.cached_length(other) == common * B, shared


def test_prompt_ids_are_those_the_app_runs(tiny_chat_model):
    """The ingress tokenizes with a weightless model as the replica's app does with the loaded one."""
    view, loaded = tokenizer_model(str(tiny_chat_model)), engine.load_model(str(tiny_chat_model))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    chat = json.dumps({"messages": messages, "max_tokens": 4}).encode()
    assert prompt_ids(view, "/v1/chat/completions", chat) == loaded.tokenizer.encode_chat(messages)
    completion = json.dumps({"prompt": "Once upon a time"}).encode()
    assert prompt_ids(view, "/v1/completions", completion) == loaded.tokenizer.encode("Once upon a time")
    assert prompt_ids(view, "/v1/completions", json.dumps({"prompt": [1, 5, 9]}).encode()) == [1, 5, 9]
    for path, raw in (("/v1/completions", b"not json"), ("/v1/chat/completions", b'{"messages": []}'),
                      ("/v1/models", b""), ("/health", b"")):
        assert prompt_ids(view, path, raw) is None  # routed by load; the replica answers the error


def test_prompt_ids_follow_the_chat_template_and_the_tools_the_replicas_use(stories260k):
    """--chat-template reaches the ingress's tokenizer as it reaches the replicas (a model with no template of its
    own would otherwise have no routing key, or keys of the wrong template); tools are rendered into the prompt."""
    view = tokenizer_model(str(stories260k), chat_template="chatml")
    loaded = engine.load_model(str(stories260k), chat_template="chatml")
    messages = [{"role": "user", "content": "Name three colours."}]
    assert prompt_ids(tokenizer_model(str(stories260k)), "/v1/chat/completions",
                      json.dumps({"messages": messages}).encode()) is None  # no template of its own
    assert prompt_ids(view, "/v1/chat/completions", json.dumps({"messages": messages}).encode()) == \
        loaded.tokenizer.encode_chat(messages)
    tool = {"type": "function", "function": {"name": "paint", "parameters": {"type": "object", "properties": {}}}}
    with_tools = prompt_ids(view, "/v1/chat/completions", json.dumps({"messages": messages, "tools": [tool]}).encode())
    assert with_tools is not None and with_tools != loaded.tokenizer.encode_chat(messages)


def test_digests_chain_the_whole_prefix():
    a = list(range(100, 100 + 3 * B + 5))
    assert len(block_digests(a)) == 3 and block_digests(a[:B - 1]) == ()
    b = a[:B] + [7] + a[B + 1:]  # differs in block 2 only
    assert block_digests(a)[0] == block_digests(b)[0] and block_digests(a)[1:] != block_digests(b)[1:]
    c = [7] + a[1:]  # differs in block 1: every later block's digest differs too, though those tokens are equal
    assert not set(block_digests(a)) & set(block_digests(c))


# ---- the affinity decision -------------------------------------------------------------------------------------------
def test_a_conversation_goes_where_its_longest_prefix_is_unless_that_queue_is_too_long():
    table = AffinityTable()
    first = block_digests(list(range(200, 200 + 4 * B)))
    table.add("a", first[:2])
    table.add("b", first)  # b served the longer history
    both = {"a": 0, "b": 0}
    choice = choose(["a", "b"], first, table, both, imbalance=2)
    assert choice.decision == AFFINITY and choice.ranks == [["b"], ["a"]]
    assert choose(["a", "b"], first, table, {"a": 0, "b": 2}, imbalance=2).ranks[0] == ["b"]  # 2 - 0 is not > 2
    choice = choose(["a", "b"], first, table, {"a": 0, "b": 3}, imbalance=2)
    assert choice.decision == LOAD and sorted(choice.ranks[0]) == ["a", "b"]  # the least loaded of all wins
    assert choose(["a", "b"], first, table, {"a": 0, "b": None}, imbalance=2).decision == AFFINITY  # unknown load
    new = choose(["a", "b"], block_digests(list(range(900, 900 + 2 * B))), table, both, imbalance=2)
    assert new.decision == NEW and sorted(new.ranks[0]) == ["a", "b"]
    assert choose(["a", "b"], (), table, both, imbalance=2).decision == NEW


def test_the_table_forgets_the_least_recently_routed_blocks_and_replicas_that_left():
    table = AffinityTable(capacity=4)
    one, two = block_digests(list(range(10, 10 + 3 * B))), block_digests(list(range(500, 500 + 3 * B)))
    table.add("a", one)
    table.add("a", two)  # 6 blocks > 4: one's leaves go first, its root last
    assert table.blocks("a") == 4 and table.matched("a", two) == 3 and table.matched("a", one) == 1
    table.keep_only(["b"])
    assert table.blocks("a") == 0 and table.matched("a", two) == 0


# ---- a replica's app, in-process ------------------------------------------------------------------------------------
def run(coroutine):
    return asyncio.run(coroutine)


async def collect(host: AppHost, request: ForwardedRequest, stop_after: int | None = None) -> list[dict]:
    messages = []
    stream = host.call(request, [(b"x-tinyllama-replica", b"r1")])
    async for message in stream:
        messages.append(message)
        if stop_after is not None and len(messages) >= stop_after:
            break
    await stream.aclose()
    return messages


def body_of(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_apphost_serves_the_single_servers_answers_and_a_closed_stream_cancels(tiny_chat_model):
    model = engine.load_model(str(tiny_chat_model))
    expected = model.complete("Once upon a time", max_new_tokens=24, temperature=0.0, ignore_eos=True).text

    async def scenario():
        host = AppHost(create_app(lambda: engine.load_model(str(tiny_chat_model)), "m"))
        await host.start()
        assert host.state.ready and host.problem() is None
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        whole = await collect(host, ForwardedRequest("POST", "/v1/completions", body=body.encode(),
                                                     headers=[(b"content-type", b"application/json")]))
        start = whole[0]
        assert start["type"] == "http.response.start" and start["status"] == 200
        assert (b"x-tinyllama-replica", b"r1") in start["headers"]
        assert json.loads(body_of(whole))["choices"][0]["text"] == expected
        streamed = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                               "ignore_eos": True, "stream": True}).encode()
        cut = await collect(host, ForwardedRequest("POST", "/v1/completions", body=streamed), stop_after=3)
        assert cut[0]["status"] == 200 and b"data: " in body_of(cut)
        for _ in range(200):  # the app saw the disconnect and cancelled the sequence
            if host.state.serving.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        aborted = host.state.metrics.requests.labels("abort")._value.get()
        in_flight = host.state.serving.in_flight
        bad = await collect(host, ForwardedRequest("POST", "/v1/completions", body=b"{"))
        health_before = await collect(host, ForwardedRequest("GET", "/health"))
        await host.stop(grace=5.0)
        health_after = await collect(host, ForwardedRequest("GET", "/health"))
        return in_flight, aborted, bad, health_before, health_after

    in_flight, aborted, bad, before, after = run(scenario())
    assert in_flight == 0 and aborted == 1
    assert bad[0]["status"] == 400 and json.loads(body_of(bad))["error"]["type"] == "invalid_request_error"
    assert before[0]["status"] == 200 and after[0]["status"] == 503


def test_apphost_start_fails_with_the_load_error(tmp_path):
    async def scenario():
        host = AppHost(create_app(lambda: engine.load_model(str(tmp_path / "absent")), "m"))
        await host.start()

    with pytest.raises(EngineError, match="absent"):
        run(scenario())


# ---- the ingress's contract -----------------------------------------------------------------------------------------
class ReplicaDied(Exception):
    pass


def ingress(forward, replicas=2, max_body=1000, failures=None):
    def classify(error):
        return Failure(503, "the replica failed", REPLICA_FAILED) if isinstance(error, ReplicaDied) else None

    async def cluster_metrics():
        return b"metrics", "text/plain"

    return IngressApp(forward, lambda path, body, headers: (1, 2), classify, lambda: replicas, cluster_metrics, max_body,
                      on_failure=(failures.append if failures is not None else lambda code: None))


async def ask(app, method, path, body=b""):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as client:
        return await client.request(method, path, content=body)


SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def test_the_ingress_relays_a_replicas_answer_with_the_routing_keys():
    seen = []

    async def forward(request):
        seen.append(request)
        yield {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]}
        yield {"type": "http.response.body", "body": b"hello ", "more_body": True}
        yield {"type": "http.response.body", "body": b"world", "more_body": False}

    r = run(ask(ingress(forward), "POST", "/v1/completions?x=1", b'{"prompt": "hi"}'))
    assert r.status_code == 201 and r.text == "hello world" and r.headers["x-a"] == "1"
    request = seen[0]
    assert (request.method, request.path, request.query_string, request.body) == ("POST", "/v1/completions", b"x=1",
                                                                                  b'{"prompt": "hi"}')
    assert request.prefix_keys == (1, 2)


def test_a_replica_that_dies_is_a_503_before_the_answer_and_an_sse_error_event_after():
    failures = []

    async def dies_first(request):
        raise ReplicaDied("actor died")
        yield  # an async generator

    async def dies_mid_stream(request):
        yield SSE_START
        yield {"type": "http.response.body", "body": b'data: {"x": 1}\n\n', "more_body": True}
        raise ReplicaDied("actor died")

    r = run(ask(ingress(dies_first, failures=failures), "POST", "/v1/completions", b"{}"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == REPLICA_FAILED and r.json()["error"]["type"] == "server_error"
    r = run(ask(ingress(dies_mid_stream, failures=failures), "POST", "/v1/completions", b"{}"))
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0]) == {"x": 1} and json.loads(events[1])["error"]["code"] == REPLICA_FAILED
    assert events[2] == "[DONE]" and failures == [REPLICA_FAILED, REPLICA_FAILED]


def test_the_ingress_answers_what_only_it_knows():
    async def never(request):
        raise AssertionError("not forwarded")
        yield

    r = run(ask(ingress(never, replicas=0), "GET", "/health"))
    assert r.status_code == 503 and r.json()["status"] == "no replica is running"
    r = run(ask(ingress(never), "POST", "/v1/completions", b"x" * 1001))
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = run(ask(ingress(never), "GET", "/metrics"))
    assert r.status_code == 200 and r.text == "metrics"


def test_a_client_that_goes_away_closes_the_forward_stream():
    closed = asyncio.Event()

    async def endless(request):
        try:
            yield SSE_START
            while True:
                yield {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def scenario():
        app = ingress(endless)
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
        gone = asyncio.Event()
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if len(sent) == 3:
                gone.set()  # the client leaves after two chunks

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        await asyncio.wait_for(app(scope, receive, send), 30)
        return closed.is_set()

    assert run(scenario())


# ---- metrics -------------------------------------------------------------------------------------------------------
def test_cluster_metrics_carry_every_replica_sample_labelled_with_its_replica():
    from prometheus_client.parser import text_string_to_metric_families

    a, b = ServerMetrics(lambda: 3, lambda: 1), ServerMetrics(lambda: 0, lambda: 2)
    a.generation_tokens.inc(5)
    a.requests.labels("stop").inc()
    a.time_to_first_token.observe(0.3)
    b.generation_tokens.inc(7)
    texts = {"r1": a.render().decode(), "r2": b.render().decode(), "r3": None}
    cluster = ClusterMetrics(lambda: 2, lambda: {"affinity": 4, "load": 0, "new": 2})
    cluster.failures.labels(REPLICA_FAILED).inc()
    merged = {}
    for family in text_string_to_metric_families(cluster.render(texts).decode()):
        for s in family.samples:
            merged[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for replica in ("r1", "r2"):
        for family in text_string_to_metric_families(texts[replica]):
            for s in family.samples:
                key = (s.name, tuple(sorted({**s.labels, "replica": replica}.items())))
                assert merged[key] == s.value
    assert merged[("tinyllama_cluster_replicas", ())] == 2
    assert merged[("tinyllama_cluster_replica_up", (("replica", "r3"),))] == 0
    assert merged[("tinyllama_router_decisions_total", (("decision", "affinity"),))] == 4
    assert merged[("tinyllama_cluster_request_failures_total", (("code", REPLICA_FAILED),))] == 1


# ---- settings ------------------------------------------------------------------------------------------------------
def test_settings_from_a_config_files_args_and_their_errors():
    s = ClusterSettings.from_dict({"model": "m", "replicas": 1, "max_replicas": 3, "threads": 2, "router": "pow2"})
    assert s.autoscaling and s.most_replicas == 3 and s.thread_env()["TINYLLAMA_NUM_THREADS"] == "2"
    assert s.model_options() == {"ref": "m", "backend": "numpy", "revision": None, "weights_dtype": "auto",
                                 "chat_template": None}
    assert ClusterSettings.from_dict(s.to_dict()) == s
    for values, name in (({"replica": 2}, "replica"), ({"replicas": 0}, "replicas"), ({"router": "x"}, "router"),
                         ({"replicas": 3, "max_replicas": 2}, "max_replicas"), ({"draft": "int8"}, "draft"),
                         ({"weights_dtype": "int3"}, "weights_dtype"), ({"max_queue": -1}, "max_queue"),
                         ({"model": "m.gguf"}, "GGUF"), ({"chat_template": "no-such-template"}, "chat_template"),
                         ({"pooling": "max"}, "pooling"), ({"served_model_name": []}, "served_model_name")):
        with pytest.raises(EngineError, match=name):
            ClusterSettings.from_dict(values)


def test_the_serve_flags_map_onto_the_cluster_settings(tmp_path):
    from engine.cli.main import build_parser
    from engine.cli.serve import cluster_settings

    args = build_parser().parse_args(["serve", "--model", "m", "--replicas", "2", "--max-replicas", "4",
                                      "--router", "pow2", "--replica-threads", "2", "--max-active", "8",
                                      "--max-queue", "9", "--no-prefix-cache", "--served-model-name", "n",
                                      "--shutdown-timeout", "7", "--speculate", "3"])
    s = cluster_settings(args)
    assert (s.model, s.replicas, s.max_replicas, s.router, s.threads) == ("m", 2, 4, "pow2", 2)
    assert (s.max_active, s.max_queue, s.prefix_cache_mb, s.name, s.shutdown_timeout) == (8, 9, 0, "n", 7.0)
    assert s.app_options()["speculation"] == {"speculate": 3, "draft": "lookup"}
    keyed = cluster_settings(build_parser().parse_args(["serve", "--model", "m", "--replicas", "2", "--api-key", "k"]))
    assert keyed.api_key == "k"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for value, passed in (("chatml", "chatml"), (str(template), template.read_text())):
        s = cluster_settings(build_parser().parse_args(["serve", "--model", "m", "--replicas", "2", "--chat-template",
                                                        value, "--served-model-name", "a", "b", "--pooling", "last"]))
        assert s.model_options()["chat_template"] == passed  # a file's text: the file need not be on every node
        options = s.app_options()
        assert (options["served_model_name"], options["model_aliases"], options["pooling"]) == ("a", ("b",), "last")
    for flags, message in ((["--replicas", "0"], "--replicas"), (["--replicas", "2", "--max-replicas", "1"],
                                                                 "--max-replicas"),
                           (["--replicas", "2", "--gguf-file", "x.gguf"], "--gguf-file"),
                           (["--replicas", "2", "--api-key", "k1", "--api-key", "k2"], "--api-key")):
        with pytest.raises(EngineError, match=message):
            cluster_settings(build_parser().parse_args(["serve", *flags]))


def test_a_deployment_failure_is_one_line():
    from engine.serve.cluster.local import deploy_failure

    report = ("Deploying application tinyllama failed\nTraceback (most recent call last):\n  File ...\n"
              "weights.errors.CheckpointError: /x: no model found (config.json is missing)\n")
    assert deploy_failure(report) == "/x: no model found (config.json is missing)"
    assert deploy_failure("something else\nthe last line") == "the last line"
