"""Embedding and reranking served by vLLM, through the gateway and in the knowledge bases.

The shared stack's (conftest.py) two pooling engines of the tiny Qwen3, started by `up` with a
role's vLLM flags: an embedding model (`--runner pooling --convert embed`) and a reranker
(`--convert classify`, read as vLLM's recipe for the original Qwen3-Reranker: the score is the
softmax of the "yes" and "no" tokens' logits, so a causal LM checkpoint serves as one). A gateway
in front of both must answer what each engine answers, with auth, scopes, bounds and usage; the
knowledge bases embed and rerank with them. Random weights: the vectors and scores mean
nothing, only that they are the engines'.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import (
    EMBED,
    RERANK,
    Gateway,
    Stack,
    create_key,
    metric,
    start_gateway,
    usage_rows,
)
from test_responses import bearer, database

TEXTS = ["大熊猫主要吃竹子。", "长城东起山海关。", "giant pandas eat bamboo"]
FILES = {"pandas.md": "# 大熊猫\n\n大熊猫主要吃竹子，每天进食十多个小时。大熊猫生活在四川的山区。",
         "wall.txt": "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关。",
         "river.txt": "长江是中国最长的河流，流经十一个省级行政区。"}


@pytest.fixture(scope="module")
def engines(stack: Stack) -> tuple[str, str]:
    """The embedder's and the reranker's URLs."""
    return stack.engine_of(EMBED), stack.engine_of(RERANK)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engines: tuple[str, str],
            tiny_qwen3: Path) -> Iterator[Gateway]:
    embed, rerank = engines
    gateway = start_gateway(
        tmp_path_factory.mktemp("pooling-gateway"), embed, "--engine-url", rerank,
        auth=True, env={
            "QWENSTACK_RAG__EMBEDDING_ENGINES": "true", "QWENSTACK_RAG__EMBEDDING_MODEL": EMBED,
            "QWENSTACK_RAG__RERANK_MODEL": RERANK, "QWENSTACK_RAG__MODE": "dense",
            "QWENSTACK_RAG__TOKENIZER": str(tiny_qwen3),
            "QWENSTACK_RAG__CHUNK_TOKENS": "32", "QWENSTACK_RAG__CHUNK_OVERLAP_TOKENS": "4",
        })
    yield gateway
    assert gateway.stop() == 0


def _post(url: str, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(url, json=body, headers=bearer(key) if key else {}, timeout=120)


def _tokens(answer: httpx.Response) -> int:
    """The tokens an engine's pooling answer reports (a rerank may give only its total)."""
    usage = answer.json()["usage"]
    return usage.get("prompt_tokens") or usage["total_tokens"]


def test_embeddings_through_the_gateway_are_the_engines(
    gateway: Gateway, engines: tuple[str, str]
) -> None:
    key = create_key(gateway.home, "--name", "embedder")
    body = {"model": EMBED, "input": TEXTS}
    direct = _post(f"{engines[0]}/v1/embeddings", body)
    assert direct.status_code == 200, direct.text
    routed = _post(f"{gateway.url}/v1/embeddings", body, key)
    assert routed.status_code == 200, routed.text
    assert routed.json()["data"] == direct.json()["data"]
    assert len(direct.json()["data"][0]["embedding"]) == 128  # the tiny model's hidden size
    tokens = direct.json()["usage"]["prompt_tokens"]
    assert routed.json()["usage"]["prompt_tokens"] == tokens > 0
    row = usage_rows(database(gateway), {routed.headers["x-request-id"]})
    assert [(r.route, r.model, r.prompt_tokens, r.status) for r in row.values()] == [
        ("/v1/embeddings", EMBED, tokens, 200)]
    # Token ids and base64 are vLLM's too.
    ids = _post(f"{gateway.url}/v1/embeddings", {"model": EMBED, "input": [[1, 2, 3]],
                                                  "encoding_format": "base64"}, key)
    assert ids.status_code == 200 and isinstance(ids.json()["data"][0]["embedding"], str)


def test_rerank_and_score_through_the_gateway_are_the_engines(
    gateway: Gateway, engines: tuple[str, str]
) -> None:
    name = f"ranker-{time.monotonic_ns()}"
    key = create_key(gateway.home, "--name", name)
    rerank = {"model": RERANK, "query": "大熊猫吃什么？", "documents": TEXTS, "top_n": 2}
    direct = _post(f"{engines[1]}/rerank", rerank)
    assert direct.status_code == 200, direct.text
    accounted = {}  # request id: (route, model, the engine's token count)
    for route in ("/v1/rerank", "/rerank"):
        routed = _post(f"{gateway.url}{route}", rerank, key)
        assert routed.status_code == 200, routed.text
        assert routed.json()["results"] == direct.json()["results"]
        assert len(routed.json()["results"]) == 2
        accounted[routed.headers["x-request-id"]] = (route, RERANK, _tokens(direct))
    for shape in ({"queries": "大熊猫吃什么？", "documents": TEXTS},
                  {"text_1": "大熊猫吃什么？", "text_2": TEXTS}):
        body = {"model": RERANK, **shape}
        direct_scores = _post(f"{engines[1]}/v1/score", body)
        routed_scores = _post(f"{gateway.url}/v1/score", body, key)
        assert routed_scores.status_code == 200, routed_scores.text
        assert routed_scores.json()["data"] == direct_scores.json()["data"]
        accounted[routed_scores.headers["x-request-id"]] = (
            "/v1/score", RERANK, _tokens(direct_scores))
    # The embedding model ranks too (cosine), as vLLM serves it.
    by_embedding = _post(f"{gateway.url}/v1/rerank", {**rerank, "model": EMBED}, key)
    assert by_embedding.status_code == 200, by_embedding.text

    # Each accounted as chat is: a usage row with the engine's tokens, and the metrics.
    rows = usage_rows(database(gateway), set(accounted))
    assert {request_id: (row.route, row.model, row.prompt_tokens)
            for request_id, row in rows.items()} == accounted
    assert all(row.status == 200 and row.caller == name for row in rows.values())
    admin = bearer(create_key(gateway.home, "--name", f"{name}-admin", "--admin"))
    requests = {route: metric(gateway.url, admin, "qwenstack_requests_total", route=route,
                              key=name, status="200")
                for route in ("/v1/rerank", "/rerank", "/v1/score")}
    assert requests == {"/v1/rerank": 2, "/rerank": 1, "/v1/score": 2}
    assert metric(gateway.url, admin, "qwenstack_prompt_tokens_total", key=name, model=RERANK) \
        == sum(tokens for _, _, tokens in accounted.values())


def test_pooling_routes_refuse_before_the_engine(gateway: Gateway) -> None:
    admin = create_key(gateway.home, "--name", "pool-admin", "--admin")
    embed_only = create_key(gateway.home, "--name", "embed-only", "--models", EMBED)
    small = create_key(gateway.home, "--name", "small-budget", "--tpm", "50")
    rerank_url = f"{gateway.url}/v1/rerank"
    query = {"model": RERANK, "query": "q", "documents": ["a", "b"]}
    assert httpx.post(f"{gateway.url}/rerank", json=query, timeout=30).status_code == 401
    denied = _post(rerank_url, query, embed_only)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    cases = [
        (rerank_url, {**query, "documents": ["d"] * 257}, "documents", "array_above_max_length"),
        (rerank_url, {**query, "documents": [{"type": "image_url"}]}, "documents",
         "invalid_type"),
        (rerank_url, {**query, "chat_template_kwargs": {}}, "chat_template_kwargs",
         "unsupported_parameter"),
        (rerank_url, {**query, "priority": -100}, "priority", "unsupported_parameter"),
        (f"{gateway.url}/v1/embeddings", {"model": EMBED, "input": "x" * 200_001}, "input",
         "string_above_max_length"),
        # Token ids count as characters, judged by the list's length (a million here).
        (f"{gateway.url}/v1/embeddings", {"model": EMBED, "input": [1] * 1_000_000}, "input",
         "string_above_max_length"),
        # A list is judged by its length even where its first item would pass.
        (f"{gateway.url}/v1/score", {"model": RERANK, "text_1": "q",
                                     "text_2": [1] + ["a"] * 1_000_000}, "text_2",
         "array_above_max_length"),
        (f"{gateway.url}/v1/embeddings", {"model": EMBED, "input": "x",
                                          "encoding_format": "bytes"}, "encoding_format",
         "invalid_type"),
        (f"{gateway.url}/v1/score", {"model": RERANK, "queries": ["a", "b"],
                                     "documents": ["a", "b", "c"]}, "documents",
         "invalid_request"),
    ]
    for url, body, param, code in cases:
        refused = _post(url, body, admin)
        assert refused.status_code == 400, (body, refused.text)
        assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (
            param, code), refused.text
    pricey = _post(rerank_url, {**query, "documents": ["大熊猫生活在四川的山区。" * 4] * 8}, small)
    assert pricey.status_code == 429 and "Request too large" in pricey.text
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


def test_a_rerank_is_bounded_before_its_pairs_are_built() -> None:
    """No engine: an 8 MB query beside 100,000 one-letter documents (a 9 MB body) would be
    800 GB of joined pairs; it is measured, and refused, in milliseconds."""
    import time

    from qwenstack.gateway.errors import GatewayError
    from qwenstack.gateway.protocol import RERANK, SCORE, InferenceRequest
    from qwenstack.gateway.validation import check_pooling
    from qwenstack.settings import RagSettings

    hostile = InferenceRequest(RERANK, {"model": RERANK, "query": "q" * 8_000_000,
                                        "documents": ["a"] * 100_000})
    started = time.perf_counter()
    with pytest.raises(GatewayError) as refused:
        check_pooling(hostile, RagSettings())
    assert time.perf_counter() - started < 1
    assert (refused.value.status, refused.value.param) == (400, "documents")
    fine = InferenceRequest(SCORE, {"model": RERANK, "text_1": ["a", "b"], "text_2": ["c", "d"]})
    check_pooling(fine, RagSettings())
    assert fine.prompts == ["a\nc", "b\nd"] and fine.pooled_size == (2, 4)


def test_knowledge_base_embeds_and_reranks_with_the_engines(
    gateway: Gateway, engines: tuple[str, str]
) -> None:
    owner = create_key(gateway.home, "--name", "kb-owner")
    created = _post(f"{gateway.url}/v1/knowledge_bases", {"name": "served"}, owner)
    assert created.status_code == 201, created.text
    assert created.json()["embedding_model"] == EMBED
    uploaded = httpx.post(f"{gateway.url}/v1/knowledge_bases/served/files",
                          headers=bearer(owner), timeout=300,
                          files=[("file", (name, text.encode())) for name, text in FILES.items()])
    assert uploaded.status_code == 200, uploaded.text
    query = "大熊猫吃什么？"
    every = _post(f"{gateway.url}/v1/knowledge_bases/served/query",
                  {"query": query, "top_k": 100}, owner)
    assert every.status_code == 200, every.text
    hits = every.json()["data"]
    assert len(hits) >= len(FILES)
    # The reranker's order of every candidate, as the engine ranks them: the query's order.
    ranked = _post(f"{engines[1]}/rerank", {"model": RERANK, "query": query,
                                                "documents": [hit["text"] for hit in hits]})
    order = [result["index"] for result in ranked.json()["results"]]
    assert order == list(range(len(hits)))
    assert [hit["score"] for hit in hits] == pytest.approx(
        [result["relevance_score"] for result in ranked.json()["results"]])
    best_two = _post(f"{gateway.url}/v1/knowledge_bases/served/query",
                     {"query": query, "top_k": 2}, owner)
    assert [hit["text"] for hit in best_two.json()["data"]] == [hit["text"] for hit in hits[:2]]


def test_an_embedder_no_engine_serves_is_a_503_to_retry(
    tmp_path: Path, engines: tuple[str, str]
) -> None:
    """Knowledge bases set to embed with a model none of the gateway's engines serves (or none
    is ready: one may be starting): creating one is a 503 that names the model, with
    Retry-After."""
    gateway = start_gateway(tmp_path, engines[0], env={
        "QWENSTACK_RAG__EMBEDDING_ENGINES": "true", "QWENSTACK_RAG__MODE": "dense",
        "QWENSTACK_RAG__EMBEDDING_MODEL": "nobody-serves-this"})
    try:
        created = _post(f"{gateway.url}/v1/knowledge_bases", {"name": "unserved"})
        assert created.status_code == 503, created.text
        assert created.json()["error"]["code"] == "embedding_unavailable"
        assert "nobody-serves-this" in created.json()["error"]["message"]
        assert created.headers["retry-after"] == "5"
    finally:
        assert gateway.stop() == 0


def test_another_embedder_is_refused_rather_than_mixed(
    gateway: Gateway, engines: tuple[str, str]
) -> None:
    """A base embedded by tiny-embed, and then the gateway's embedder changed (to its own
    MiniLM) on the same home: searching it, or filling it, is a 409, never two vector spaces
    mixed in one collection. Last in the module: it stops the module's gateway (a Milvus Lite
    file is held by one process)."""
    owner = create_key(gateway.home, "--name", "mixer")
    assert _post(f"{gateway.url}/v1/knowledge_bases", {"name": "mixed"}, owner).status_code == 201
    assert gateway.stop() == 0
    other = start_gateway(gateway.home.parent, engines[0], auth=True,
                          env={"QWENSTACK_RAG__MODE": "dense"})  # same home: tmp/home
    try:
        query = _post(f"{other.url}/v1/knowledge_bases/mixed/query", {"query": "熊猫"}, owner)
        assert query.status_code == 409, query.text
        assert query.json()["error"]["code"] == "embedding_model_mismatch"
        assert EMBED in query.json()["error"]["message"]
        upload = httpx.post(f"{other.url}/v1/knowledge_bases/mixed/files", timeout=300,
                            headers=bearer(owner), files=[("file", ("a.txt", b"text"))])
        assert upload.status_code == 409, upload.text
    finally:
        assert other.stop() == 0

