"""Prometheus metrics of one server, in a CollectorRegistry of its own (never the process-wide default one, so two
apps in one process, as in tests, do not collide).

The load gauges are also exported under vLLM's names (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` and its older name `vllm:gpu_cache_usage_perc`, labelled `model_name`), so routers that read
vLLM's metrics (Kubernetes' inference gateway, ...) read ours unchanged. KV cache usage is the fraction, 0 to 1, of
the KV the batch can hold (max_active sequences of a full window) that its sequences hold now."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class ServerMetrics:
    """Requests running / waiting (read at scrape time), token counters, and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 prefix_cache: Callable[[], object] = lambda: None,
                 kv_cache_usage: Callable[[], float] = lambda: 0.0, model_name: Callable[[], str] = lambda: ""):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(PrefixCacheCollector(prefix_cache))
        r.register(VllmLoadCollector(running, waiting, kv_cache_usage, model_name))
        self.prompt_tokens_cached = Counter("tinyllama_prompt_tokens_cached", "Prompt tokens restored from the "
                                            "prefix cache instead of prefilled", registry=r)
        self.prompt_tokens_prefilled = Counter("tinyllama_prompt_tokens_prefilled", "Prompt tokens run through the "
                                               "model (a prompt shared by n choices counts once)", registry=r)
        Gauge("tinyllama_requests_running", "Sequences in the batch now", registry=r).set_function(running)
        Gauge("tinyllama_requests_waiting", "Requests waiting for a place in the batch",
              registry=r).set_function(waiting)
        self.prompt_tokens = Counter("tinyllama_prompt_tokens", "Prompt tokens of requests that reached their first "
                                     "token", registry=r)
        self.generation_tokens = Counter("tinyllama_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("tinyllama_requests_finished", "Requests ended, by finish reason (abort: cancelled "
                                "by the client going away or the server stopping)", ["finish_reason"], registry=r)
        self.errors = Counter("tinyllama_request_errors", "Error responses, by HTTP status",
                                ["status"], registry=r)
        self.clients_gone = Counter("tinyllama_clients_gone", "Clients that disconnected before their answer was "
                                    "complete, by stage (upload: while sending the request; waiting: before a whole "
                                    "response; streaming: mid-stream)", ["stage"], registry=r)
        self.time_to_first_token = Histogram("tinyllama_time_to_first_token_seconds", "From the request's arrival "
                                             "to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("tinyllama_time_per_output_token_seconds", "Between consecutive "
                                               "tokens of one request", buckets=TOKEN_BUCKETS, registry=r)
        self.inspections_running = Gauge("tinyllama_inspections_running", "/v1/inspect requests running (taking "
                                         "a place of --max-inspections)", registry=r)
        self.request_latency = Histogram("tinyllama_request_latency_seconds", "From the request's arrival to its "
                                         "last token", buckets=REQUEST_BUCKETS, registry=r)

    def count_prompt(self, result) -> None:
        """Count a finished request's prompt tokens taken from the prefix cache and prefilled (a GenerationResult;
        a forked choice, which prefilled nothing, shares its sibling's count)."""
        if result.prefill_tokens:
            self.prompt_tokens_cached.inc(result.cached_tokens)
            self.prompt_tokens_prefilled.inc(result.prefill_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """The prefix cache's evictions (a counter) and size (bytes, blocks), read at scrape time; absent without one."""

    def __init__(self, prefix_cache: Callable[[], object]):
        self.prefix_cache = prefix_cache

    def collect(self):
        """Prometheus metric families of the current PrefixCache (none when there is none)."""
        pool = self.prefix_cache()
        if pool is None:
            return
        yield CounterMetricFamily("tinyllama_prefix_cache_evictions", "Prefix cache blocks evicted to make room",
                                  value=pool.evictions)
        yield GaugeMetricFamily("tinyllama_prefix_cache_bytes", "Bytes of KV blocks held by the prefix cache",
                                value=pool.nbytes)
        yield GaugeMetricFamily("tinyllama_prefix_cache_capacity_bytes", "The prefix cache's limit "
                                "(--prefix-cache-mb)", value=pool.max_blocks * pool.block_nbytes)
        yield GaugeMetricFamily("tinyllama_prefix_cache_blocks", "KV blocks held by the prefix cache",
                                value=pool.blocks)


class VllmLoadCollector:
    """Requests running and waiting and the KV cache's use under vLLM's metric names, read at scrape time."""

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 kv_cache_usage: Callable[[], float], model_name: Callable[[], str]):
        self.running, self.waiting, self.kv_cache_usage, self.model_name = running, waiting, kv_cache_usage, model_name

    def collect(self):
        """vLLM's gauges, each with one sample labelled model_name."""
        name = self.model_name()
        for metric, doc, value in (
                ("vllm:num_requests_running", "Requests in the batch now", self.running()),
                ("vllm:num_requests_waiting", "Requests waiting for a place in the batch", self.waiting()),
                ("vllm:kv_cache_usage_perc", "KV cache usage: 1 means the batch's sequences hold all the KV it can "
                 "hold", self.kv_cache_usage()),
                ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc under its older name", self.kv_cache_usage())):
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            yield family
