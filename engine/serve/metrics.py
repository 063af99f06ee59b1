"""Prometheus metrics of one server, in a CollectorRegistry of its own (never the process-wide default one, so two
apps in one process, as in tests, do not collide)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class ServerMetrics:
    """Requests running / waiting (read at scrape time), token counters, and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.request_latency = Histogram("tinyllama_request_latency_seconds", "From the request's arrival to its "
                                         "last token", buckets=REQUEST_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
