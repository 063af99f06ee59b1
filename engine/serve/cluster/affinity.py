"""Prefix-cache affinity: which replica holds the longest prefix of a request, and when load wins over it.

The router remembers, per replica, the block digests (engine.serve.cluster.routing) of the prompts it sent there:
that replica's prefix cache holds those blocks unless it evicted them (the table forgets the least recently routed
blocks past a capacity, and a replica that leaves forgets all of its). A request goes to the replica holding the
longest run of its leading blocks, unless that replica's queue (ongoing requests, as Ray Serve counts them) is
longer than the shortest queue by more than `imbalance`: then load wins and the least loaded replica takes it. A
request that matches nowhere (a new conversation) goes to the least loaded replica, ties broken at random.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

AFFINITY = "affinity"  # sent to the replica holding its longest prefix
LOAD = "load"  # a replica held its prefix, but its queue was too long: sent by load
NEW = "new"  # no replica held any of its blocks: sent by load
DECISIONS = (AFFINITY, LOAD, NEW)


class AffinityTable:
    """Per replica id, the digests of the blocks routed to it, at most `capacity` each (least recently routed go)."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def add(self, replica: str, digests) -> None:
        """Remember that `replica` now holds the blocks `digests` (a prompt's chain, first block first)."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for digest in reversed(digests):  # the first block ends most recent: a shared prefix outlives its branches
            held[digest] = None
            held.move_to_end(digest)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def matched(self, replica: str, digests) -> int:
        """How many leading blocks of `digests` `replica` holds."""
        held = self._blocks.get(replica)
        if not held:
            return 0
        n = 0
        for digest in digests:
            if digest not in held:
                break
            n += 1
        return n

    def keep_only(self, replicas) -> None:
        """Forget every replica not in `replicas` (they left, or died)."""
        for replica in set(self._blocks) - set(replicas):
            del self._blocks[replica]

    def blocks(self, replica: str) -> int:
        """How many block digests are remembered for `replica`."""
        return len(self._blocks.get(replica, ()))


@dataclass
class Choice:
    """Replica ids in ranks (the first rank preferred; within a rank the least loaded wins) and why."""

    ranks: list[list[str]]
    decision: str


def choose(candidates: list[str], digests, table: AffinityTable, queue_lengths: dict[str, int | None],
           imbalance: int, rng: random.Random | None = None) -> Choice:
    """Rank `candidates` for a request whose prompt has block `digests`; `queue_lengths`: the ongoing requests of each
    candidate where known (None: unknown, then load cannot override affinity for it)."""
    rng = rng or random
    shuffled = list(candidates)
    rng.shuffle(shuffled)  # equal candidates in random order: ties do not all land on the first replica
    lengths = {r: table.matched(r, digests) for r in shuffled} if digests else {}
    best = max(lengths.values(), default=0)
    if best == 0:
        return Choice([shuffled], NEW)
    preferred = [r for r in shuffled if lengths[r] == best]
    others = [r for r in shuffled if lengths[r] < best]
    known = {r: q for r, q in queue_lengths.items() if q is not None and r in lengths}
    preferred_queues = [known[r] for r in preferred if r in known]
    if preferred_queues and len(preferred_queues) == len(preferred) and known:
        if min(preferred_queues) - min(known.values()) > imbalance:
            return Choice([shuffled], LOAD)
    return Choice([preferred, others] if others else [preferred], AFFINITY)
