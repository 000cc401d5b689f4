"""The routing policies on their own: pure functions of the replicas' load and the request."""

from __future__ import annotations

from collections import Counter

import pytest

from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.protocol import InferenceRequest
from qwenstack.gateway.replicas import Replica
from qwenstack.gateway.routing import (
    LeastOutstanding,
    PrefixAware,
    RoundRobin,
    SessionAffinity,
    block_hashes,
)

SYSTEM = "You are a terse assistant. " * 20  # 540 bytes: two 256-byte blocks


def replicas(n: int) -> list[Replica]:
    return [Replica(f"http://engine-{i}:8000", up=True, index=i) for i in range(n)]


def chat(*messages: tuple[str, str], user: str | None = None) -> Exchange:
    payload = {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}
    if user:
        payload["user"] = user
    return Exchange("id", InferenceRequest("/v1/chat/completions", payload))


def prefix_policy(**overrides: int) -> PrefixAware:
    options = {"block_bytes": 256, "max_blocks": 64, "max_entries": 1000, "load_slack": 2}
    return PrefixAware(**(options | overrides))


def test_round_robin_takes_turns_and_orders_the_rest_as_fallbacks():
    pool, policy = replicas(3), RoundRobin()
    firsts = [policy.order(pool, chat(("user", "hi"))).replicas[0].index for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]
    assert sorted(r.index for r in policy.order(pool, chat(("user", "hi"))).replicas) == [0, 1, 2]


def test_load_counts_engine_queue_reported_and_changes_since():
    replica = Replica("http://e:1")
    replica.in_flight = 2
    replica.read_metrics(
        b'# HELP x\nvllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
        b'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0\n'
        b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
    )
    assert (replica.engine_queue, replica.kv_cache_usage, replica.load()) == (7, 0.25, 7)
    replica.in_flight += 1  # sent since the poll: not in the engine's figure yet
    assert replica.load() == 8
    replica.in_flight -= 3  # finished since: counted off
    assert replica.load() == 5
    replica.engine_queue = 0  # never below what is in flight here
    replica.in_flight = 1
    assert replica.load() == 1


def test_least_outstanding_picks_least_loaded_and_rotates_ties():
    pool, policy = replicas(3), LeastOutstanding()
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 2
    assert [r.index for r in policy.order(pool, chat(("user", "hi"))).replicas] == [1, 2, 0]
    for replica in pool:
        replica.in_flight = 0
    firsts = Counter(policy.order(pool, chat(("user", "hi"))).replicas[0].index for _ in range(30))
    assert firsts == {0: 10, 1: 10, 2: 10}


def test_session_affinity_is_sticky_and_moves_only_a_lost_replicas_sessions():
    pool, policy = replicas(4), SessionAffinity()
    sessions = [f"s{i}" for i in range(200)]
    placed = {s: policy.order(pool, chat(("user", "hi"), user=s)).replicas[0] for s in sessions}
    assert len(set(placed.values())) == 4  # spread over all
    for _ in range(3):  # sticky, whatever the load
        pool[0].in_flight += 5
        for session, replica in placed.items():
            assert policy.order(pool, chat(("user", "x"), user=session)).replicas[0] is replica
    survivors = pool[1:]
    for session, replica in placed.items():
        now = policy.order(survivors, chat(("user", "x"), user=session)).replicas[0]
        assert now is replica or replica is pool[0]


def test_session_affinity_header_wins_over_user_field():
    pool, policy = replicas(8), SessionAffinity()
    exchange = chat(("user", "hi"), user="u")
    exchange.session = "header-session"
    other = chat(("user", "hi"), user="header-session")
    assert policy.order(pool, exchange).replicas[0] is policy.order(pool, other).replicas[0]


def test_canonical_prompt_of_a_later_turn_extends_the_earlier_one():
    first = chat(("system", SYSTEM), ("user", "q1")).request.canonical_prompt()
    later = chat(("system", SYSTEM), ("user", "q1"), ("assistant", "a1"),
                 ("user", "q2")).request.canonical_prompt()
    assert later.startswith(first)
    assert InferenceRequest("/v1/completions", {"prompt": "abc"}).canonical_prompt() == b"abc"
    assert InferenceRequest("/v1/completions", {"prompt": [1, 2]}).canonical_prompt() == b"[1,2]"
    assert InferenceRequest("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text"}]}]}).canonical_prompt()


def test_block_hashes_are_chained_and_only_of_complete_blocks():
    a = block_hashes(b"x" * 600, 256, 64)
    b = block_hashes(b"x" * 512 + b"y" * 100, 256, 64)
    assert len(a) == 2 and a == b  # the incomplete third block is not hashed
    assert a[0] != a[1]  # the second names both blocks, not the second alone
    assert block_hashes(b"x" * 256 + b"z" * 256, 256, 64)[0] == a[0]
    assert block_hashes(b"x" * 256 + b"z" * 256, 256, 64)[1] != a[1]
    assert len(block_hashes(b"x" * 10_000, 256, 3)) == 3


def test_prefix_aware_sends_later_turns_where_the_conversation_went():
    pool, policy = replicas(3), prefix_policy()
    homes = {}
    for conversation in range(6):
        system = f"{conversation} {SYSTEM}"
        exchange = chat(("system", system), ("user", "q1"))
        placement = policy.order(pool, exchange)
        homes[conversation] = home = placement.replicas[0]
        placement.placed(home)
    assert len({r.index for r in homes.values()}) == 3  # new prefixes spread while idle
    for conversation, home in homes.items():
        system = f"{conversation} {SYSTEM}"
        later = chat(("system", system), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
        assert policy.order(pool, later).replicas[0] is home


def test_prefix_aware_leaves_a_holder_busier_than_the_slack():
    pool, policy = replicas(2), prefix_policy(load_slack=2)
    exchange = chat(("system", SYSTEM), ("user", "q"))
    placement = policy.order(pool, exchange)
    holder = placement.replicas[0]
    placement.placed(holder)
    other = pool[1 - holder.index]
    holder.in_flight = 2  # within the slack: stays
    assert policy.order(pool, chat(("system", SYSTEM), ("user", "q"))).replicas[0] is holder
    holder.in_flight = 3  # beyond: the least busy takes it, and becomes the prefix's holder
    moved = chat(("system", SYSTEM), ("user", "q"))
    placement = policy.order(pool, moved)
    assert placement.replicas[0] is other
    placement.placed(other)
    holder.in_flight = 0
    assert policy.order(pool, chat(("system", SYSTEM), ("user", "q"))).replicas[0] is other


def test_prefix_aware_forgets_least_recently_used_and_ignores_gone_replicas():
    pool, policy = replicas(2), prefix_policy(max_entries=2)
    first = chat(("system", SYSTEM), ("user", "q"))  # two blocks: fills the memory
    policy.order(pool, first).placed(pool[1])
    assert policy.order(pool, chat(("system", SYSTEM))).replicas[0] is pool[1]
    # The holder is not a candidate (down, or its circuit open): another takes it.
    assert policy.order([pool[0]], chat(("system", SYSTEM))).replicas[0] is pool[0]
    other = chat(("system", "other " + SYSTEM))
    policy.order(pool, other).placed(pool[0])
    firsts = {policy.order(pool, chat(("system", SYSTEM))).replicas[0].index for _ in range(4)}
    assert firsts == {0, 1}  # forgotten: plain least-loaded rotation again


@pytest.mark.parametrize(
    "payload", [{}, {"messages": "text"}, {"messages": [1, None]}, {"prompt": None}]
)
def test_prefix_aware_routes_odd_payloads(payload):
    pool, policy = replicas(2), prefix_policy()
    exchange = Exchange("id", InferenceRequest("/v1/chat/completions", payload))
    assert len(policy.order(pool, exchange).replicas) == 2


def test_pool_membership_keeps_known_engines_and_their_labels():
    from qwenstack.gateway.replicas import ReplicaPool

    pool = ReplicaPool(["http://a:1", "http://b:1", "http://c:1"], session=None, interval_s=1)
    b = pool.replicas[1]
    b.up, b.in_flight = True, 2
    pool.set_urls(["http://b:1", "http://d:1"])  # a and c left, d came
    assert [(r.url, r.index) for r in pool.replicas] == [("http://d:1", 0), ("http://b:1", 1)]
    assert pool.replicas[1] is b and b.up and b.in_flight == 2
    assert not pool.replicas[0].up  # until its health check passes


def test_dns_discovery_lists_each_address_once():
    import asyncio

    from qwenstack.gateway.replicas import DnsDiscovery

    urls = asyncio.run(DnsDiscovery(("localhost",), 8000, 10).urls())
    assert "http://127.0.0.1:8000" in urls and len(urls) == len(set(urls))
    assert all(u in ("http://127.0.0.1:8000", "http://[::1]:8000") for u in urls)


def test_dns_discovery_of_several_models_keeps_each_names_last_engines():
    import asyncio

    from qwenstack.gateway.replicas import DnsDiscovery

    discovery = DnsDiscovery(("localhost", "embedder.invalid"), 8000, 10)
    discovery._last["embedder.invalid"] = ["http://10.0.0.7:8000"]  # found by an earlier lookup
    urls = asyncio.run(discovery.urls())
    # The name that no longer resolves (RFC 2606: .invalid never does) keeps its engine.
    assert "http://10.0.0.7:8000" in urls and "http://127.0.0.1:8000" in urls
