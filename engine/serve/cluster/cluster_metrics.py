"""The cluster's /metrics: every replica's own metrics (those of `tinyllama serve`), each sample labelled with its
replica, plus what only the ingress sees: replicas reachable, whether each has reported (every 2 s, through Ray
Serve's routing stats, so the view lags by about that), the router's
decisions and the requests the cluster failed (a replica that died, a full queue).

Sum over `replica` for the cluster's figures (tokens/s: rate(tinyllama_generation_tokens_total[1m]) summed; cache
use: tinyllama_prefix_cache_bytes summed), or keep it to compare replicas.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def relabel(texts: dict[str, str]) -> list[Metric]:
    """Parse each replica's exposition and merge the families, every sample given replica=<id> -> metric families
    (a family's type and help from the first replica that has it)."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                into.samples.append(Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp,
                                           s.exemplar))
    return list(merged.values())


class ClusterMetrics:
    """The ingress's own counters and the merged exposition. `replicas_running()`: replicas the router reaches now;
    `decisions()`: the router's decision counts ({'affinity': n, ...}; empty for a router that keeps none)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replicas_running: Callable[[], int | None], decisions: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.failures = Counter("tinyllama_cluster_request_failures", "Requests the cluster could not serve, by "
                                "code (replica_failed: the replica died or was unreachable; cluster_busy: Ray "
                                "Serve's queue was full)", ["code"], registry=self.registry)
        self.replicas_running = replicas_running
        self.decisions = decisions

    def render(self, replica_texts: dict[str, str | None]) -> bytes:
        """The exposition: the ingress's metrics, then each replica's (None: it has not reported yet)."""
        answered = {r: t for r, t in replica_texts.items() if t is not None}
        own = [_gauge("tinyllama_cluster_replicas", "Replicas the request router can send requests to",
                      self.replicas_running() or 0)]
        up = GaugeMetricFamily("tinyllama_cluster_replica_up", "Whether the replica has reported its metrics",
                               labels=[REPLICA_LABEL])
        for replica in sorted(replica_texts):
            up.add_metric([replica], 1 if replica_texts[replica] is not None else 0)
        own.append(up)
        decisions = self.decisions()
        if decisions:
            family = CounterMetricFamily("tinyllama_router_decisions", "Requests routed, by why the router chose "
                                         "their replica (affinity: it held the prompt's longest prefix; load: it "
                                         "did but its queue was too long; new: no replica held any of it)",
                                         labels=["decision"])
            for decision, count in sorted(decisions.items()):
                family.add_metric([decision], count)
            own.append(family)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(own + relabel(answered)))
        return generate_latest(self.registry) + generate_latest(registry)


class _Families:
    """A collector yielding fixed metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        """The families."""
        return iter(self.families)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
