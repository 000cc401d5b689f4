"""Usage records: one row per request, on a SQLite file and on PostgreSQL, none lost on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import forkhost
import httpx
import pytest
from helpers import Gateway, create_key, start_gateway, usage_rows

MODEL = "tiny-qwen3"
TOKENS = 8
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": TOKENS,
    "ignore_eos": True,
}
COMPLETION = {
    "model": MODEL,
    "prompt": "The capital of France is",
    "max_tokens": TOKENS,
    "ignore_eos": True,
}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'home' / 'qwenstack.db'}"


def _gateway_with_key(
    tmp: Path, engine_url: str, database_url: str, name: str
) -> tuple[Gateway, dict, str]:
    env = {"QWENSTACK_DATABASE_URL": database_url}
    # Unique per run: the PostgreSQL database serves the whole test session.
    key = create_key(tmp / "home", "--name", name, "--admin", env=env)
    return start_gateway(tmp, engine_url, env=env, auth=True), env, key


def test_usage_rows_match_the_requests(engine_url: str, database_url: str, tmp_path: Path):
    name = f"usage-{time.monotonic_ns()}"
    gateway, env, key = _gateway_with_key(tmp_path, engine_url, database_url, name)
    auth = {"authorization": f"Bearer {key}"}
    expected: dict[
        str, tuple[int, int | None, bool]
    ] = {}  # id -> (status, completion tokens, stream)
    try:
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=60) as client:

            def call(path: str, body: dict, stream: bool = False) -> None:
                request_id = f"{name}-{len(expected)}"
                headers = {"x-request-id": request_id}
                if stream:
                    with client.stream(
                        "POST", path, json={**body, "stream": True}, headers=headers
                    ) as r:
                        r.read()
                else:
                    r = client.post(path, json=body, headers=headers)
                expected[request_id] = (
                    r.status_code,
                    TOKENS if r.status_code == 200 else None,
                    stream,
                )

            for _ in range(3):
                call("/v1/chat/completions", CHAT)
            call("/v1/completions", COMPLETION)
            call(
                "/v1/chat/completions",
                {**CHAT, "stream_options": {"include_usage": True}},
                stream=True,
            )
            call("/v1/completions", COMPLETION, stream=True)
            call("/v1/chat/completions", {**CHAT, "model": "no-such-model"})
            call("/v1/completions", {**COMPLETION, "prompt": "hello " * 3000})
        rows = usage_rows(database_url, set(expected))
        assert set(rows) == set(expected)
        for request_id, (status, completion_tokens, stream) in expected.items():
            row = rows[request_id]
            assert (row.status, row.caller) == (status, name), request_id
            if status == 200:
                assert row.model == MODEL and row.completion_tokens == completion_tokens
                assert row.prompt_tokens > 0 and row.latency_ms > 0
                assert (row.ttft_ms is not None) == stream and (row.ttft_ms or 0) <= row.latency_ms
        assert [rows[i].status for i in expected][-2:] == [404, 400]

        answered = [i for i, (status, *_) in expected.items() if status == 200]
        report = httpx.get(f"{gateway.url}/admin/usage?by=key&since=1h", headers=auth).json()[
            "data"
        ]
        [mine] = [entry for entry in report if entry["key"] == name]
        assert mine["requests"] == len(expected) and mine["errors"] == len(expected) - len(answered)
        assert mine["completion_tokens"] == TOKENS * len(answered)
        assert mine["prompt_tokens"] == sum(rows[i].prompt_tokens for i in expected)
        cli = forkhost.run(["usage", "--by", "key", "--since", "1d", "--home", str(gateway.home)],
                           env={**os.environ, **env}, check=True).stdout
        [line] = [line.split() for line in cli.splitlines() if line.startswith(name)]
        assert line[1:5] == [
            str(mine["requests"]),
            str(mine["errors"]),
            str(mine["prompt_tokens"]),
            str(mine["completion_tokens"]),
        ]
    finally:
        assert gateway.stop() == 0


def test_sigterm_during_load_loses_no_answered_request(
    engine_url: str, database_url: str, tmp_path: Path
):
    name = f"sigterm-{time.monotonic_ns()}"
    gateway, _, key = _gateway_with_key(tmp_path, engine_url, database_url, name)
    answered: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(
            base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            for n in range(10_000):
                if stop.is_set():
                    return
                request_id = f"{name}-{worker}-{n}"
                body = CHAT if n % 2 else COMPLETION
                try:
                    response = client.post(
                        "/v1/chat/completions" if n % 2 else "/v1/completions",
                        json=body,
                        headers={"x-request-id": request_id},
                    )
                except httpx.TransportError:
                    failed.append(request_id)
                    return  # the gateway is going away
                (answered if response.status_code == 200 else failed).append(request_id)

    workers = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 120
        while len(answered) < 16:  # under load: SIGTERM while requests are in flight
            assert time.monotonic() < deadline and not failed, failed
            time.sleep(0.05)
        gateway.process.send_signal(signal.SIGTERM)
        answered_before_signal = len(answered)
        assert gateway.process.wait(60) == 0
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        if gateway.process.poll() is None:
            gateway.stop()

    # The process is gone: every row is written by now, or lost.
    rows = usage_rows(database_url, set(answered), timeout_s=0)
    missing = set(answered) - set(rows)
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no usage row"
    assert all(rows[i].status == 200 and rows[i].completion_tokens == TOKENS for i in answered)
    # Requests in flight at the signal were answered (graceful stop), and recorded as well.
    assert len(answered) > answered_before_signal
