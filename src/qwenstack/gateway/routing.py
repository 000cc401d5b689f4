"""Which engine replica takes a request: the routing policies.

Every policy orders the replicas that may take a request (up, serving the model, circuit
closed): the first gets it, the next is where a request that failed before its first byte is
retried. Each costs O(replicas) per request, plus, for `prefix_aware`, hashing the prompt's
leading blocks once; nothing per streamed chunk.

- `round_robin`: in turn, blind to load.
- `least_outstanding`: the replica with the fewest requests outstanding (see `Replica.load`).
- `session_affinity`: a session (`x-session-id` header, else the body's `user`) always goes to
  the same replica while it is up (rendezvous hashing: when a replica leaves, only its sessions
  move); requests without a session go least-outstanding.
- `prefix_aware` (default): to the replica that served the longest matching leading blocks of
  the prompt most recently, where vLLM's prefix cache most likely still holds their KV, unless
  that replica has `prefix_load_slack` more requests outstanding than the least busy one; new
  prefixes go least-outstanding. Chat is multi-turn: every turn resends the whole conversation,
  so on a long conversation this skips most of the prefill (the slowest part of time to first
  token), while the slack keeps one popular prefix (a shared system prompt) from pinning
  everything on one replica.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.replicas import Replica
from qwenstack.settings import RoutingSettings

SESSION_HEADER = "x-session-id"


def _forget(replica: Replica) -> None:
    pass


@dataclass(frozen=True)
class Placement:
    """A routing decision: the replicas to try, in order, and what the policy learns once one of
    them took the request (its engine answered)."""

    replicas: list[Replica]
    placed: Callable[[Replica], None] = _forget


class RoutingPolicy(Protocol):
    def order(self, candidates: list[Replica], exchange: Exchange) -> Placement:
        """`candidates` (non-empty) in the order to try them."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, candidates: list[Replica], exchange: Exchange) -> Placement:
        return Placement(self.rotate(candidates))

    def rotate(self, candidates: list[Replica]) -> list[Replica]:
        start = next(self._turn) % len(candidates)
        return candidates[start:] + candidates[:start]

    def by_load(self, candidates: list[Replica]) -> list[Replica]:
        """Least loaded first; equal loads in turn, so an idle pool is not all replica 0's."""
        return sorted(self.rotate(candidates), key=Replica.load)


class LeastOutstanding(RoundRobin):
    def order(self, candidates: list[Replica], exchange: Exchange) -> Placement:
        return Placement(self.by_load(candidates))


def _rendezvous(session: str, replica: Replica) -> bytes:
    return hashlib.blake2b(f"{session}\0{replica.url}".encode(), digest_size=8).digest()


class SessionAffinity(RoundRobin):
    def order(self, candidates: list[Replica], exchange: Exchange) -> Placement:
        session = exchange.session or exchange.request.get("user")
        if not session or not isinstance(session, str):
            return Placement(self.by_load(candidates))
        return Placement(sorted(candidates, key=lambda replica: _rendezvous(session, replica),
                                reverse=True))


def block_hashes(prompt: bytes, block_bytes: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the prompt's complete leading blocks: the i-th names the first i+1."""
    hasher = hashlib.blake2b(digest_size=8)
    hashes = []
    for start in range(0, min(len(prompt) // block_bytes, max_blocks) * block_bytes, block_bytes):
        hasher.update(prompt[start:start + block_bytes])
        hashes.append(hasher.digest())
    return hashes


class PrefixAware(RoundRobin):
    def __init__(
        self, block_bytes: int, max_blocks: int, max_entries: int, load_slack: int
    ) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.max_entries = max_entries
        self.load_slack = load_slack
        # block hash -> url of the replica that last served a prompt starting with those blocks,
        # least recently used first. URLs, not replicas: discovery may replace replica objects.
        self._where: OrderedDict[bytes, str] = OrderedDict()

    def order(self, candidates: list[Replica], exchange: Exchange) -> Placement:
        ranked = self.by_load(candidates)
        prompt = exchange.request.canonical_prompt()
        hashes = block_hashes(prompt, self.block_bytes, self.max_blocks)

        def placed(replica: Replica) -> None:
            self._remember(hashes, replica)

        least = ranked[0].load()
        by_url = {replica.url: replica for replica in ranked}
        for block_hash in reversed(hashes):  # longest known prefix first
            url = self._where.get(block_hash)
            holder = by_url.get(url) if url else None
            if holder is not None:
                if holder.load() > least + self.load_slack:
                    break  # too busy: the prefill elsewhere costs less than the wait here
                ranked.remove(holder)
                return Placement([holder, *ranked], placed)
        return Placement(ranked, placed)

    def _remember(self, hashes: list[bytes], replica: Replica) -> None:
        where = self._where
        for block_hash in hashes:
            where[block_hash] = replica.url
            where.move_to_end(block_hash)
        while len(where) > self.max_entries:
            where.popitem(last=False)


def make_policy(settings: RoutingSettings) -> RoutingPolicy:
    if settings.policy == "round_robin":
        return RoundRobin()
    if settings.policy == "least_outstanding":
        return LeastOutstanding()
    if settings.policy == "session_affinity":
        return SessionAffinity()
    return PrefixAware(settings.prefix_block_bytes, settings.prefix_max_blocks,
                       settings.prefix_max_entries, settings.prefix_load_slack)
