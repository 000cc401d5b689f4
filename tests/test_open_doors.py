"""Issue 12's attacker tries against a real gateway (and engine), kept as tests: bodies judged
before they are read, slow clients dropped, nothing told without a key, and a limiter whose
Redis failures are counted and whose evicting Redis is reported."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from helpers import Gateway, RedisServer, create_key, start_gateway
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-qwen3"
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
MAX_UPLOAD_BYTES = 100_000
TWO_HUNDRED_MB = 200_000_000
# The bound for a trickling client to be dropped, with the defaults.
DROPPED_WITHIN_S = 20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    """Default settings but the upload limit, with auth on."""
    gateway = start_gateway(tmp_path_factory.mktemp("open-doors"), engine_url, auth=True, env={
        "QWENSTACK_RAG__MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    })
    yield gateway
    assert gateway.stop() == 0


@pytest.fixture(scope="module")
def keys(gateway: Gateway) -> dict[str, str]:
    return {"admin": create_key(gateway.home, "--name", "root", "--admin"),
            "tenant": create_key(gateway.home, "--name", "tenant")}


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def connect(gateway: Gateway, timeout_s: float = 10) -> socket.socket:
    address = urlsplit(gateway.url)
    return socket.create_connection((address.hostname, address.port), timeout=timeout_s)


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "host: x", *headers, "", ""]).encode()


def answer_to_head(gateway: Gateway, request_head: bytes) -> tuple[int, bytes]:
    """The status and body answered to a request head alone: none of its body is ever sent,
    so any answer proves the body was judged without being read (an old gateway waits)."""
    with connect(gateway) as sock:
        sock.sendall(request_head)
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# --- 3: one body limit for every route, judged before it is read -----------------------------


def test_non_admin_announcing_200_mb_to_admin_gets_403_without_sending_it(gateway, keys):
    status, body = answer_to_head(gateway, head(
        "POST", "/admin/keys", f"authorization: Bearer {keys['tenant']}",
        "content-type: application/json", f"content-length: {TWO_HUNDRED_MB}"))
    assert status == 403 and b'"code":"admin_only"' in body


@pytest.mark.parametrize("path", [
    "/admin/keys", "/v1/embeddings", "/v1/knowledge_bases", "/v1/knowledge_bases/any/files",
    "/v1/chat/completions", "/v1/rerank", "/rerank", "/v1/score", "/admin/lora_adapters",
])
def test_an_announced_body_over_the_limit_gets_413_before_it_is_sent(gateway, keys, path):
    status, body = answer_to_head(gateway, head(
        "POST", path, f"authorization: Bearer {keys['admin']}",
        "content-type: application/json", f"content-length: {TWO_HUNDRED_MB}"))
    assert status == 413 and b'"code":"request_too_large"' in body


def test_a_chunked_upload_is_cut_off_at_the_limit(gateway, keys):
    """200 MB offered in chunks: the 413 comes while they are still being sent."""
    sent = 0
    with connect(gateway) as sock:
        sock.sendall(head(
            "POST", "/v1/knowledge_bases/any/files", f"authorization: Bearer {keys['admin']}",
            "content-type: multipart/form-data; boundary=b", "transfer-encoding: chunked"))
        part = b'--b\r\ncontent-disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"%x\r\n%s\r\n" % (2**16, b"x" * 2**16)
        with contextlib.suppress(OSError):  # the gateway closes the connection after its 413
            while sent < TWO_HUNDRED_MB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += 2**16
        received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 413 "), received
    # At most the limit plus what socket buffers hold was sent before the answer.
    assert sent < TWO_HUNDRED_MB / 10


def _chunked(parts: list[bytes]) -> Iterator[bytes]:
    yield from parts  # a generator: httpx sends it chunked, with no content-length


def test_the_upload_limit_is_for_all_files_of_a_request(gateway, keys):
    created = httpx.post(f"{gateway.url}/v1/knowledge_bases", headers=bearer(keys["tenant"]),
                         json={"name": "limits"}, timeout=300)
    assert created.status_code == 201, created.text
    each = b"words " * (MAX_UPLOAD_BYTES // 6 - 100)  # under the limit alone, over it with two
    body = b"".join(
        b"--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"%d.txt\"\r\n"
        b"content-type: text/plain\r\n\r\n%s\r\n" % (i, each) for i in range(2)) + b"--b--\r\n"
    response = httpx.post(
        f"{gateway.url}/v1/knowledge_bases/limits/files", timeout=120,
        headers={**bearer(keys["tenant"]), "content-type": "multipart/form-data; boundary=b"},
        content=_chunked([body[i:i + 8192] for i in range(0, len(body), 8192)]))
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    listed = httpx.get(f"{gateway.url}/v1/knowledge_bases/limits/files",
                       headers=bearer(keys["tenant"]), timeout=60)
    assert listed.json()["data"] == []
    one = httpx.post(f"{gateway.url}/v1/knowledge_bases/limits/files", timeout=300,
                     headers=bearer(keys["tenant"]), files=[("file", ("0.txt", each))])
    assert one.status_code == 200, one.text


# --- 8: slow clients ------------------------------------------------------------------------


def _dropped_while_trickling(sock: socket.socket, pieces: Iterator[bytes]) -> tuple[float, bytes]:
    """Seconds until the gateway ends the connection, sending one piece a second; its answer."""
    started = time.monotonic()
    sock.settimeout(1)
    for piece in pieces:
        if time.monotonic() - started > DROPPED_WITHIN_S + 5:
            break
        try:
            sock.sendall(piece)
            answer = sock.recv(65536)
        except TimeoutError:
            continue  # one second passed with nothing from the gateway: send the next piece
        except OSError:
            answer = b""
        return time.monotonic() - started, answer
    raise AssertionError(f"still connected after {time.monotonic() - started:.0f} s")


def test_a_client_trickling_header_lines_is_dropped_within_20_s(gateway):
    lines = (b"x-line-%d: y\r\n" % i for i in range(60))
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        elapsed, answer = _dropped_while_trickling(sock, lines)
    assert elapsed < DROPPED_WITHIN_S
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer


def test_a_client_trickling_its_body_is_dropped_within_20_s(gateway, keys):
    with connect(gateway) as sock:
        sock.sendall(head("POST", "/v1/completions", f"authorization: Bearer {keys['tenant']}",
                          "content-type: application/json", "content-length: 1000"))
        elapsed, answer = _dropped_while_trickling(sock, (b" " for _ in range(60)))
    assert elapsed < DROPPED_WITHIN_S
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer


def test_connections_beyond_the_cap_get_503_and_the_rest_are_served(tmp_path, engine_url):
    gateway = start_gateway(tmp_path, engine_url, env={"QWENSTACK_GATEWAY__MAX_CONNECTIONS": "4"})
    try:
        held = [connect(gateway) for _ in range(4)]
        with connect(gateway) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while (status := _status_or_none(f"{gateway.url}/v1/completions")) != 200:
            assert time.monotonic() < deadline, status  # closed connections are freed
            time.sleep(0.2)
    finally:
        gateway.stop()


def _status_or_none(url: str) -> int | None:
    try:
        return httpx.post(url, json=COMPLETION, timeout=60).status_code
    except httpx.HTTPError:
        return None


# --- 10: closed by default --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_are_for_admins_only(gateway, keys, path):
    assert httpx.get(gateway.url + path).status_code == 401
    assert httpx.get(gateway.url + path, headers=bearer(keys["tenant"])).status_code == 403
    assert httpx.get(gateway.url + path, headers=bearer(keys["admin"])).status_code == 200


def test_metrics_name_callers_to_admins_and_prometheus_only(gateway, keys):
    httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, headers=bearer(keys["tenant"]),
               timeout=60)
    unauthenticated = httpx.get(f"{gateway.url}/metrics")
    assert unauthenticated.status_code == 401 and "tenant" not in unauthenticated.text
    other_tenant = httpx.get(f"{gateway.url}/metrics", headers=bearer(keys["tenant"]))
    assert other_tenant.status_code == 403 and "tenant" not in other_tenant.text
    assert other_tenant.json()["error"]["code"] == "metrics_readers_only"
    prometheus = create_key(gateway.home, "--name", "prometheus")  # observability.metrics_readers
    for reader in (keys["admin"], prometheus):
        page = httpx.get(f"{gateway.url}/metrics", headers=bearer(reader), timeout=30).text
        samples = [s for f in text_string_to_metric_families(page) for s in f.samples]
        assert any(s.labels.get("key") == "tenant" for s in samples)


def test_ready_shows_engine_detail_to_admins_only(gateway, keys, engine_url):
    for headers in ({}, bearer(keys["tenant"]), bearer("sk-qs-forged")):
        ready = httpx.get(f"{gateway.url}/ready", headers=headers)
        assert ready.json() == {"status": "ready", "engines_up": 1, "engines_total": 1,
                                "queued": 0}
        assert urlsplit(engine_url).netloc not in ready.text
    detail = httpx.get(f"{gateway.url}/ready", headers=bearer(keys["admin"])).json()
    assert [engine["url"] for engine in detail["engines"]] == [engine_url]


# --- 12: the limiter's Redis ----------------------------------------------------------------


def _limiter_errors(gateway: Gateway) -> float:
    page = httpx.get(f"{gateway.url}/metrics", timeout=30).text  # auth off: no key needed
    return next(s.value for f in text_string_to_metric_families(page) for s in f.samples
                if s.name == "qwenstack_limiter_errors_total")


def test_limiter_outage_is_counted_whichever_way_it_fails(
    tmp_path: Path, engine_url: str, own_redis: RedisServer, unique_prefix: str
):
    env = {"QWENSTACK_LIMITS__REDIS_URL": own_redis.url,
           "QWENSTACK_LIMITS__KEY_PREFIX": unique_prefix,
           "QWENSTACK_LIMITS__DEFAULT_RPM": "100"}
    fail_open = start_gateway(tmp_path / "open", engine_url, env=env)
    fail_closed = start_gateway(tmp_path / "closed", engine_url,
                                env={**env, "QWENSTACK_LIMITS__REDIS_FAIL_OPEN": "false"})
    try:
        for gateway in (fail_open, fail_closed):
            assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION,
                              timeout=60).status_code == 200
            assert _limiter_errors(gateway) == 0
        own_redis.stop()
        for gateway, status in ((fail_open, 200), (fail_closed, 503)):
            for _ in range(2):
                response = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION,
                                      timeout=60)
                assert response.status_code == status
            assert _limiter_errors(gateway) == 2
    finally:
        fail_open.stop()
        fail_closed.stop()


@pytest.mark.parametrize("policy, user, logged", [
    ("allkeys-lru", None, "has maxmemory-policy allkeys-lru"),
    ("noeviction", None, None),
    # CONFIG denied to the limiter's user (as managed Redis services do): said, not fatal.
    ("allkeys-lru", "limiter", "Could not read the limiter Redis's maxmemory-policy"),
])
def test_gateway_warns_at_start_when_the_limiters_redis_evicts(
    tmp_path: Path, engine_url: str, own_redis: RedisServer, policy: str, user: str | None,
    logged: str | None,
):
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", policy)
    url = own_redis.url
    if user:
        admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                          categories=["+@all"], commands=["-config"])
        url = url.replace("redis://", f"redis://{user}:pw@")
    gateway = start_gateway(tmp_path, engine_url, env={"QWENSTACK_LIMITS__REDIS_URL": url,
                                                       "QWENSTACK_LIMITS__DEFAULT_RPM": "100"})
    try:
        assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION,
                          timeout=60).status_code == 200
        log = gateway.log.read_text()
    finally:
        gateway.stop()
    if logged:
        assert logged in log
    else:
        assert "maxmemory-policy" not in log
