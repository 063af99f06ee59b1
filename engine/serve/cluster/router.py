"""Ray Serve request routers for the replicas (Ray Serve's RequestRouter API; they run inside the ingress's process).

PrefixAffinityRouter sends a request to the replica holding the longest prefix of its prompt's token ids, unless
that replica's queue is too long compared with the others' (engine.serve.cluster.affinity decides; the keys are
the prefix cache's blocks, engine.serve.cluster.routing). Ray Serve LLM's PrefixCacheAffinityRouter plays the same
part for vLLM, but keys on the prompt's raw text in a prefix tree held by a separate actor; ours keys on exactly
what the prefix cache keys on and keeps its table in the router (one per ingress replica).

PowerOfTwoRouter is Ray Serve's default policy (power of two choices), unchanged: the comparison the affinity
router is measured against. Both register in this process (engine.serve.cluster.registry), so the ingress can list
the replicas they route to and read each one's routing stats (where a replica reports its /metrics).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from engine.serve.cluster import registry
from engine.serve.cluster.affinity import DECISIONS, AffinityTable, choose

# Ray Serve pickles this module by value into the process that routes (the ingress's): keep no shared state here.
PENDING_DECISIONS = 4096  # decisions kept for requests not yet routed


def _request_of(pending_request: Optional[PendingRequest]):
    """The ForwardedRequest (anything with prefix_keys) a call carries as its first argument, else None."""
    if pending_request is None or not pending_request.args:
        return None
    return pending_request.args[0]


class RouterState:
    """What both routers share: registration, and the replicas with their routing stats (read by the ingress)."""

    def _register(self) -> None:
        registry.register(self._deployment_id.app_name, self._deployment_id.name, self)

    def replica_ids(self) -> list[str]:
        """The ids (ReplicaID.unique_id) of the replicas requests can be routed to now."""
        return sorted(r.unique_id for r in list(self._replicas))

    def replica_stats(self) -> dict[str, dict]:
        """Each replica's latest routing stats (what its record_routing_stats returned; {} before the first)."""
        return {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in list(self._replicas.values())}

    def decisions(self) -> dict[str, int]:
        """Requests routed so far, by decision ({} for a router that does not decide by prefix)."""
        return {}



class PrefixAffinityRouter(RouterState, RequestRouter):
    """Prefix-cache affinity with a load override (see the module docstring). Settings (request_router_kwargs):
    imbalance (default 8), capacity (block digests remembered per replica, default 200,000)."""

    def initialize_state(self, imbalance: int = 8, capacity: int = 200_000, **kwargs):
        """Ray Serve calls this once with the deployment's request_router_kwargs."""
        self._imbalance = imbalance
        self._table = AffinityTable(capacity)
        self._decisions = dict.fromkeys(DECISIONS, 0)  # every key present: read from another thread while counted
        self._pending_decisions: OrderedDict[str, str] = OrderedDict()  # request id -> decision, until routed
        self._register()

    def decisions(self) -> dict[str, int]:
        """Requests routed so far, by decision (affinity, load, new)."""
        return dict(self._decisions)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        """Ranks of replicas for the request (Ray Serve tries the first rank first, least loaded replica first)."""
        if pending_request is not None:
            # A next call for this request comes after a backoff (when no replica could take it, all being full);
            # Ray Serve's LocalityMixin sets this flag, and without it the routing task would spin.
            pending_request.routing_context.should_backoff = True
        digests = getattr(_request_of(pending_request), "prefix_keys", ())
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queue_lengths = {}
        if digests:
            unknown = [r for r in candidate_replicas if self._replica_queue_len_cache.get(r.replica_id) is None]
            if unknown and any(self._table.matched(i, digests) for i in by_id):
                await self._probe_queue_lens(unknown, 0)  # load may override affinity: know every queue
            queue_lengths = {i: self._replica_queue_len_cache.get(r.replica_id) for i, r in by_id.items()}
        choice = choose(list(by_id), digests, self._table, queue_lengths, self._imbalance)
        if digests and pending_request is not None:
            self._pending_decisions[pending_request.metadata.internal_request_id] = choice.decision
            while len(self._pending_decisions) > PENDING_DECISIONS:  # requests cancelled before they were routed
                self._pending_decisions.popitem(last=False)
        return [[by_id[i] for i in rank] for rank in choice.ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Remember the request's blocks on the replica it went to, and count why it went there."""
        digests = getattr(_request_of(pending_request), "prefix_keys", ())
        if not digests:
            return
        self._table.add(replica_id.unique_id, digests)
        decision = self._pending_decisions.pop(pending_request.metadata.internal_request_id, None)
        if decision is not None:
            self._decisions[decision] += 1

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        """Ray Serve's new replica set; the blocks of replicas that left are forgotten."""
        super().update_replicas(replicas)
        self._table.keep_only(r.replica_id.unique_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A replica died: route nothing more to it, and forget its blocks (its successor starts empty)."""
        super().on_replica_actor_died(replica_id)
        self._table.keep_only(r.unique_id for r in self._replicas if r != replica_id)


class PowerOfTwoRouter(RouterState, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (power of two choices, FIFO), registered for the ingress."""

    def initialize_state(self, **kwargs):
        """Ray Serve calls this once; this router has no settings."""
        self._register()
