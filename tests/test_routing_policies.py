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
    rendezvous,
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
    options = {"prompt_bytes": 256, "max_bytes": 16_384, "load_slack": 2}
    return PrefixAware(**(options | overrides))


def test_round_robin_takes_turns_and_orders_the_rest_as_fallbacks():
    pool, policy = replicas(3), RoundRobin()
    firsts = [policy.order(pool, chat(("user", "hi")))[0].index for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]
    assert sorted(r.index for r in policy.order(pool, chat(("user", "hi")))) == [0, 1, 2]


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
    assert [r.index for r in policy.order(pool, chat(("user", "hi")))] == [1, 2, 0]
    for replica in pool:
        replica.in_flight = 0
    firsts = Counter(policy.order(pool, chat(("user", "hi")))[0].index for _ in range(30))
    assert firsts == {0: 10, 1: 10, 2: 10}


def test_session_affinity_is_sticky_and_moves_only_a_lost_replicas_sessions():
    pool, policy = replicas(4), SessionAffinity()
    sessions = [f"s{i}" for i in range(200)]
    placed = {s: policy.order(pool, chat(("user", "hi"), user=s))[0] for s in sessions}
    assert len(set(placed.values())) == 4  # spread over all
    for _ in range(3):  # sticky, whatever the load
        pool[0].in_flight += 5
        for session, replica in placed.items():
            assert policy.order(pool, chat(("user", "x"), user=session))[0] is replica
    survivors = pool[1:]
    for session, replica in placed.items():
        now = policy.order(survivors, chat(("user", "x"), user=session))[0]
        assert now is replica or replica is pool[0]


def test_session_affinity_header_wins_over_user_field():
    pool, policy = replicas(8), SessionAffinity()
    exchange = chat(("user", "hi"), user="u")
    exchange.session = "header-session"
    other = chat(("user", "hi"), user="header-session")
    assert policy.order(pool, exchange)[0] is policy.order(pool, other)[0]


def start(*messages: tuple[str, str]) -> bytes:
    return chat(*messages).request.conversation_start(256, 16_384)


def test_conversation_start_is_what_every_turn_starts_with():
    first = start(("system", SYSTEM), ("user", "q1"))
    assert first == start(("system", SYSTEM), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    assert first.endswith(b"user\x1fq1\x1e")
    assert first != start(("system", SYSTEM), ("user", "q2"))  # a shared system prompt alone
    assert start(("system", SYSTEM)) == start(("system", SYSTEM))[:16_384]
    assert len(chat(("user", "x" * 50_000)).request.conversation_start(256, 1000)) == 1000
    completions = "/v1/completions"
    turn = "x" * 300
    assert InferenceRequest(completions, {"prompt": turn}).conversation_start(256, 16_384) \
        == InferenceRequest(completions, {"prompt": turn + "more"}).conversation_start(
            256, 16_384) == b"x" * 256
    assert InferenceRequest(completions, {"prompt": [1, 2]}).conversation_start(256, 99) \
        == b"[1,2]"
    assert InferenceRequest("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text"}]}]}).conversation_start(9, 99)


def test_rendezvous_is_the_same_on_every_gateway_and_moves_only_a_lost_replicas_keys():
    keys = [f"k{i}".encode() for i in range(300)]
    here = {key: rendezvous(key, replicas(4))[0].url for key in keys}
    elsewhere = replicas(4)[::-1]  # another gateway: its own objects, listed in another order
    assert here == {key: rendezvous(key, elsewhere)[0].url for key in keys}
    assert len(set(here.values())) == 4
    survivors = replicas(4)[1:]
    for key, url in here.items():
        now = rendezvous(key, survivors)[0].url
        assert now == url or url == "http://engine-0:8000"


def test_prefix_aware_sends_every_turn_where_the_conversation_went_on_any_gateway():
    gateways = [(replicas(3), prefix_policy()) for _ in range(2)]
    homes = {}
    for conversation in range(12):
        pool, policy = gateways[conversation % 2]
        homes[conversation] = policy.order(pool, chat(("system", SYSTEM),
                                                      ("user", f"q{conversation}")))[0].url
    assert len(set(homes.values())) == 3  # conversations spread, even with one system prompt
    for conversation, home in homes.items():
        pool, policy = gateways[1 - conversation % 2]  # the next turn reaches the other one
        later = chat(("system", SYSTEM), ("user", f"q{conversation}"), ("assistant", "a1"),
                     ("user", "q2"))
        assert policy.order(pool, later)[0].url == home


def test_prefix_aware_passes_over_a_replica_busier_than_the_slack():
    pool, policy = replicas(3), prefix_policy(load_slack=2)
    exchange = chat(("system", SYSTEM), ("user", "q"))
    order = policy.order(pool, exchange)
    home, second = order[0], order[1]
    home.in_flight = 2  # within the slack: stays
    assert policy.order(pool, exchange)[0] is home
    home.in_flight = 3  # beyond: the next in the conversation's own order, on every gateway
    assert policy.order(pool, exchange) == [second, home, order[2]]
    second.in_flight = 3
    assert policy.order(pool, exchange)[0] is order[2]
    home.in_flight = 0
    assert policy.order(pool, exchange)[0] is home
    # Its replica not a candidate (down, or its circuit open): the next takes it.
    assert policy.order([second, order[2]], exchange)[0] is order[2]


@pytest.mark.parametrize(
    "payload", [{}, {"messages": "text"}, {"messages": [1, None]}, {"prompt": None}]
)
def test_prefix_aware_routes_odd_payloads(payload):
    pool, policy = replicas(2), prefix_policy()
    exchange = Exchange("id", InferenceRequest("/v1/chat/completions", payload))
    assert len(policy.order(pool, exchange)) == 2


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
