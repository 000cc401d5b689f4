"""Which engine replica takes a request: the routing policies.

Every policy orders the replicas that may take a request (up, serving the model, circuit
closed): the first gets it, the next is where a request that failed before its first byte is
retried. Each costs O(replicas) per request, plus, for `prefix_aware`, one hash of the start of
the conversation; nothing per streamed chunk. No policy keeps a table of where requests went, so
any number of gateways (and of worker processes in one) route alike.

- `round_robin`: in turn, blind to load.
- `least_outstanding`: the replica with the fewest requests outstanding (see `Replica.load`).
- `session_affinity`: a session (`x-session-id` header, else the body's `user`) always goes to
  the same replica while it is up (rendezvous hashing: when a replica leaves, only its sessions
  move); requests without a session go least-outstanding.
- `prefix_aware` (default): a conversation always goes to the same replica, where vLLM's prefix
  cache holds the KV of its earlier turns: rendezvous hashing of what every turn starts with
  (`InferenceRequest.conversation_start`: the messages up to the first user message), with
  bounded load: a replica with more than `prefix_load_slack` requests outstanding beyond the
  least busy one is passed over for the next in the conversation's order. Chat is multi-turn:
  every turn resends the whole conversation, so on a long conversation this skips most of the
  prefill (the slowest part of time to first token). The hash needs no memory of earlier
  turns, so N gateways send a conversation's turns to the same engine whichever of them each
  turn reaches; the bound keeps one hot conversation start (many clients sending the same first
  question) from pinning everything on one replica.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Protocol

from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.replicas import Replica
from qwenstack.settings import RoutingSettings

SESSION_HEADER = "x-session-id"


class RoutingPolicy(Protocol):
    def order(self, candidates: list[Replica], exchange: Exchange) -> list[Replica]:
        """`candidates` (non-empty) in the order to try them."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, candidates: list[Replica], exchange: Exchange) -> list[Replica]:
        return self.rotate(candidates)

    def rotate(self, candidates: list[Replica]) -> list[Replica]:
        start = next(self._turn) % len(candidates)
        return candidates[start:] + candidates[:start]

    def by_load(self, candidates: list[Replica]) -> list[Replica]:
        """Least loaded first; equal loads in turn, so an idle pool is not all replica 0's."""
        return sorted(self.rotate(candidates), key=Replica.load)


class LeastOutstanding(RoundRobin):
    def order(self, candidates: list[Replica], exchange: Exchange) -> list[Replica]:
        return self.by_load(candidates)


def rendezvous(key: bytes, candidates: list[Replica]) -> list[Replica]:
    """The candidates in `key`'s own order (highest random weight first): the same on every
    gateway, and when a replica leaves only the keys it led move, each to its next."""
    digest = hashlib.blake2b(key, digest_size=16).digest()  # one pass over a long key

    def weight(replica: Replica) -> bytes:
        return hashlib.blake2b(digest + replica.url.encode(), digest_size=8).digest()

    return sorted(candidates, key=weight, reverse=True)


class SessionAffinity(RoundRobin):
    def order(self, candidates: list[Replica], exchange: Exchange) -> list[Replica]:
        session = exchange.session or exchange.request.get("user")
        if not session or not isinstance(session, str):
            return self.by_load(candidates)
        return rendezvous(session.encode(), candidates)


class PrefixAware(RoundRobin):
    def __init__(self, prompt_bytes: int, max_bytes: int, load_slack: int) -> None:
        super().__init__()
        self.prompt_bytes = prompt_bytes
        self.max_bytes = max_bytes
        self.load_slack = load_slack

    def order(self, candidates: list[Replica], exchange: Exchange) -> list[Replica]:
        start = exchange.request.conversation_start(self.prompt_bytes, self.max_bytes)
        if not start:
            return self.by_load(candidates)
        ranked = rendezvous(start, candidates)
        bound = min(replica.load() for replica in candidates) + self.load_slack
        # The first within the bound: the conversation's own replica unless it is too busy,
        # where a prefill elsewhere costs less than the wait. The least busy always is.
        home = next(replica for replica in ranked if replica.load() <= bound)
        ranked.remove(home)
        return [home, *ranked]


def make_policy(settings: RoutingSettings) -> RoutingPolicy:
    if settings.policy == "round_robin":
        return RoundRobin()
    if settings.policy == "least_outstanding":
        return LeastOutstanding()
    if settings.policy == "session_affinity":
        return SessionAffinity()
    return PrefixAware(settings.prefix_prompt_bytes, settings.prefix_max_bytes,
                       settings.prefix_load_slack)
