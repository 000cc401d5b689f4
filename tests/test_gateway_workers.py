"""Two gateway worker processes on one port (`gateway.workers`), in front of the session's
engine: a key's limits hold exactly across them, every request has its usage row, /metrics sums
both, a start that could not share what it must is refused, and SIGTERM drains both."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import forkhost
import httpx
import pytest
from helpers import (
    Gateway,
    create_key,
    free_port,
    metric,
    process_stat,
    refused,
    start_gateway,
    usage_rows,
    wait_for,
)
from prometheus_client.mmap_dict import MmapedDict

from qwenstack.errors import SetupError
from qwenstack.gateway.limit_stores import Quota, SqliteStore
from qwenstack.gateway.workers import worker_count
from qwenstack.settings import load_settings

MODEL = "tiny-qwen3"
# Two workers, and what they must share shared: no answer cache (none of these requests may be
# answered from one anyway), knowledge bases on a server (none is used here). Limits need no
# setting: without Redis, workers share them through a SQLite file.
WORKERS = {"QWENSTACK_GATEWAY__WORKERS": "2", "QWENSTACK_CACHE__ENABLED": "false",
           "QWENSTACK_RAG__MILVUS_URI": "http://127.0.0.1:9"}


def per_worker(gateway: Gateway, sample: str, **labels: str) -> dict[int, float]:
    """A sample's value in each worker process's own metrics file (prometheus_client's
    multiprocess folder), by the worker's pid."""
    values: dict[int, float] = {}
    for path in (gateway.home / "run" / "gateway-metrics").glob("*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, found, _ = json.loads(key)
            if name == sample and labels.items() <= found.items():
                values[pid] = values.get(pid, 0.0) + value
    return values


def take_requests(path: Path, rounds: int) -> int:
    """In a process of its own: requests taken from a 50-a-minute budget in `path`."""
    async def take() -> int:
        store = SqliteStore(path, lease_s=60)
        quota = Quota(rpm=50, tpm=None, concurrency=2)
        taken = 0
        for i in range(rounds):
            decision = await store.acquire("caller", quota, 0, f"{os.getpid()}-{i}")
            if decision.refused is None:
                taken += 1
                await store.settle("caller", quota, 0, f"{os.getpid()}-{i}")
        await store.close()
        return taken

    return asyncio.run(take())


def test_budgets_in_the_shared_file_are_exact_across_processes(tmp_path: Path):
    started = time.monotonic()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        taken = list(pool.map(take_requests, [tmp_path / "limits.db"] * 2, [200, 200]))
    refilled = (time.monotonic() - started) * 50 / 60
    # The budget once (and what refilled meanwhile), not once per process.
    assert 50 <= sum(taken) <= 50 + refilled, (taken, refilled)


SHARED = {"cache.backend": "redis", "cache.redis_url": "redis://127.0.0.1:6379/0",
          "rag.milvus_uri": "http://milvus:19530"}


def test_worker_count_follows_the_expected_token_rate_and_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert worker_count(load_settings(**SHARED), has_gpu=False) == 1  # a CPU engine's rate
    assert worker_count(load_settings(**SHARED, **{"gateway.expected_tokens_per_s": 25_000}),
                        has_gpu=False) == min(3, cores)
    two_gpu_engines = load_settings(**SHARED, **{"engine.replicas": 2})
    assert worker_count(two_gpu_engines, has_gpu=True) == min(3, cores)  # 2 x 15,000 tokens/s
    assert worker_count(load_settings(**SHARED, **{"gateway.expected_tokens_per_s": 10**9}),
                        has_gpu=False) == cores
    # Per-process state keeps the default at one; asked for more, the start is refused.
    assert worker_count(load_settings(**{"engine.replicas": 2}), has_gpu=True) == 1
    assert worker_count(load_settings(**SHARED, **{"gateway.workers": 5}), has_gpu=False) == 5
    with pytest.raises(SetupError, match="cache.backend=redis"):
        worker_count(load_settings(**{"gateway.workers": 2, "rag.milvus_uri": "http://m:1"}),
                     has_gpu=False)


def test_workers_are_refused_where_state_would_be_per_process(tmp_path: Path):
    out = forkhost.run(
        ["gateway", "--engine-url", "http://127.0.0.1:9", "--home", str(tmp_path / "home"),
         "--port", str(free_port())],
        timeout=60, env={**os.environ, "QWENSTACK_GATEWAY__WORKERS": "2"},
    )
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert "gateway.workers=2" in message, message
    assert "cache.backend=redis" in message and "rag.milvus_uri" in message, message


def test_two_workers_hold_a_keys_limit_exactly_and_record_every_request(
    engine_url: str, tmp_path: Path
):
    home = tmp_path / "home"
    admin = create_key(home, "--name", "admin", "--admin")
    limited = create_key(home, "--name", "limited", "--rpm", "6")
    gateway = start_gateway(tmp_path, engine_url, env=WORKERS, auth=True)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4}

        def call(i: int) -> tuple[str, int]:
            request_id = f"limited-{i}"
            answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120,
                                headers={"authorization": f"Bearer {limited}",
                                         "x-request-id": request_id})
            return request_id, answer.status_code

        # All at once, on connections of their own: the bucket (6, refilled at 0.1 a second)
        # decides every one of them within the same second, whichever worker takes it.
        with ThreadPoolExecutor(16) as pool:
            statuses = dict(pool.map(call, range(16)))
        assert sorted(statuses.values()) == [200] * 6 + [429] * 10, statuses
        # Both workers took requests: the limit held across them, not within one.
        taken = per_worker(gateway, "qwenstack_requests_total", key="limited")
        assert len(taken) == 2 and all(taken.values()), taken
        # One usage row per request, whichever worker wrote it, as the client saw it.
        rows = usage_rows(f"sqlite:///{home / 'qwenstack.db'}", set(statuses))
        assert {rid: row.status for rid, row in rows.items()} == statuses
        assert all(row.completion_tokens == 4 for row in rows.values() if row.status == 200)
        # /metrics, from whichever worker answers, counts both workers' requests.
        for status, count in (("200", 6), ("429", 10)):
            assert metric(gateway.url, {"authorization": f"Bearer {admin}"},
                          "qwenstack_requests_total", key="limited", status=status) == count
    finally:
        gateway.stop()


@pytest.mark.engine_exclusive  # holds long streams on both workers
def test_sigterm_drains_both_workers(engine_url: str, tmp_path: Path):
    gateway = start_gateway(tmp_path, engine_url, env={
        **WORKERS, "QWENSTACK_GATEWAY__DRAIN_TIMEOUT_S": "120"})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 600,
            "ignore_eos": True, "stream": True}

    def stream(_: int) -> tuple[int, bool]:
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                          timeout=300) as answer:
            events = [line for line in answer.iter_lines() if line]
        return answer.status_code, events[-1] == "data: [DONE]"

    def streaming() -> list[float]:
        return sorted(per_worker(gateway, "qwenstack_requests_in_flight").values())

    try:
        with ThreadPoolExecutor(12) as pool:
            # One stream after another until both workers hold some: which worker accepts a
            # connection is the kernel's and the workers' race, not ours.
            streams = []
            while len([held for held in streaming() if held]) < 2:
                assert len(streams) < 12, streaming()
                streams.append(pool.submit(stream, len(streams)))
                wait_for(lambda: sum(streaming()) == len(streams), "the stream under way", 60)
            gateway.process.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(gateway.url), "new connections refused", 15)
            outcomes = [s.result() for s in streams]
        assert outcomes == [(200, True)] * len(streams)  # every accepted one ran to its end
        assert gateway.process.wait(120) == 0
    finally:
        if gateway.process.poll() is None:
            gateway.stop()


def test_a_killed_parent_takes_its_workers_with_it(tmp_path: Path):
    """No engine needed: a second gateway on the port is refused; SIGKILL the first (as the
    OOM killer would): its workers end too, and the port is refused, not left hanging."""
    gateway = start_gateway(tmp_path, "http://127.0.0.1:9", env=WORKERS, until="/health")
    pids = [int(line.split("(pid ")[1].split(",")[0]) for line in gateway.log.read_text()
            .splitlines() if "Gateway worker" in line and "started (pid" in line]
    assert len(pids) == 2
    # Its port is held: a second gateway on it is refused, rather than taking half the
    # connections through a socket of its own (SO_REUSEPORT).
    port = gateway.url.rsplit(":", 1)[1]
    second = forkhost.run(
        ["gateway", "--engine-url", "http://127.0.0.1:9", "--home", str(tmp_path / "second"),
         "--port", port],
        timeout=60, env={**os.environ, **WORKERS},
    )
    assert second.returncode != 0 and "cannot listen" in second.stderr, second.stderr
    gateway.process.kill()
    gateway.process.wait(10)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
    wait_for(lambda: refused(gateway.url), "the port refused", 10)


def alive(pid: int) -> bool:
    return (stat := process_stat(pid)) is not None and stat.state != "Z"
