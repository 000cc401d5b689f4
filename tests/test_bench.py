"""`qwenstack bench` against a real vLLM engine (and a real gateway in front of it).

Figures must agree with each other and with the engine's own counters; nothing here asserts
speed. While developing, QWENSTACK_TEST_ENGINE_URL may name an engine other sessions also use:
the counter check then retries until it sees a window with no traffic but ours.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import forkhost
import httpx
import pytest
import uvloop
from helpers import start_gateway

from qwenstack import bench
from qwenstack.bench import datasets, loadgen
from qwenstack.bench.datasets import DatasetError

CMRC = Path(__file__).parent / "data" / "cmrc2018_trial_first20.json"
COUNTERS = (
    "vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:request_success_total"
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return forkhost.run(list(args), timeout=600)


def _counters(engine_url: str) -> dict[str, float]:
    page = httpx.get(f"{engine_url}/metrics", timeout=10).text
    # Each counter summed over its label sets: `name{...} value` lines.
    return {
        name: sum(
            float(m[1])
            for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", page, re.MULTILINE)
        )
        for name in COUNTERS
    }


def _assert_consistent(s: dict, requests: int, output_len: int) -> None:
    assert s["completed"] == requests and s["errors"] == 0 and s["usage_reported"]
    # ignore_eos: every answer is exactly max_tokens long
    assert s["output_tokens"] == requests * output_len
    assert s["prompt_tokens"] > 0
    assert s["output_throughput"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(s["completed"] / s["duration_s"])
    assert s["total_token_throughput"] == pytest.approx(
        (s["prompt_tokens"] + s["output_tokens"]) / s["duration_s"])
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[metric]
        assert all(d[k] is not None and d[k] > 0 for k in ("mean", "median", "p90", "p99")), metric
        assert d["median"] <= d["p90"] <= d["p99"], metric
    assert s["ttft_ms"]["median"] < s["e2e_ms"]["median"]


@pytest.mark.engine_exclusive  # reads the engine's own counters
def test_bench_figures_agree_with_each_other_and_the_engine(engine_url: str, tmp_path: Path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", engine_url, "--concurrency", "1,4", "--num-prompts", "8", "--input-len", "24",
            "--output-len", "12", "--warmup", "0", "--slo-ttft-ms", "60000",
            "--json", str(out_json), "--plot", str(out_png)]
    for _ in range(3):
        before = _counters(engine_url)
        run = _cli(*args)
        after = _counters(engine_url)
        assert run.returncode == 0, run.stderr
        result = json.loads(out_json.read_text())
        generated = sum(s["output_tokens"] for s in result["results"])
        engine_generated = (
            after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        )
        if engine_generated == generated:
            break  # a window in which only this benchmark used the engine
    summaries = result["results"]
    assert [s["load"] for s in summaries] == ["c=1", "c=4"]
    for s in summaries:
        _assert_consistent(s, requests=8, output_len=12)
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # an SLO every request meets
    # The engine's own counters saw exactly the tokens and requests the report counts.
    delta = {name: after[name] - before[name] for name in COUNTERS}
    assert delta["vllm:generation_tokens_total"] == generated == 2 * 8 * 12
    assert delta["vllm:prompt_tokens_total"] == sum(s["prompt_tokens"] for s in summaries)
    assert delta["vllm:request_success_total"] == 16
    assert "c=4" in run.stdout and "TTFT med" in run.stdout
    assert out_png.read_bytes().startswith(b"\x89PNG")


def test_stream_timestamps_one_per_token(engine_url: str):
    """Each vLLM event is a token, or a few when the engine's server is busy (it merges what a
    slow reader has not taken): the event timestamps give the inter-token gaps."""
    targets = [loadgen.Target("engine", engine_url)]
    prompts = datasets.random_prompts(6, 16, 10)
    for api in ("chat", "completions"):
        options = loadgen.RequestOptions(model="tiny-qwen3", api=api)
        [[run]] = uvloop.run(loadgen.run_interleaved(
            targets, prompts, [loadgen.Load(concurrency=3)], options, requests_per_run=6))
        for record in run.records:
            assert record.error is None and record.output_tokens == 10
            events = len(record.token_times)
            assert 2 <= events <= 10 and len(record.itls()) == events - 1
            assert record.tpot == pytest.approx(sum(record.itls()) / 9)
            assert (record.started < record.token_times[0] <= record.token_times[-1]
                    <= record.finished)


def test_rate_sweep_and_unstreamed_answers(engine_url: str):
    targets = [loadgen.Target("engine", engine_url)]
    loads = [bench.Load(rate=20.0), bench.Load(rate=float("inf"), max_concurrency=2)]
    summaries, ratios = bench.benchmark(
        targets, datasets.random_prompts(8, 16, 4), loads,
        bench.RequestOptions(model="tiny-qwen3", api="completions", stream=False),
        requests_per_run=4,
    )
    assert ratios == []
    assert [s["load"] for s in summaries] == ["rate=20/s", "rate=inf/s"]
    for s in summaries:
        assert s["completed"] == 4 and s["output_tokens"] == 16
        assert s["ttft_ms"]["median"] == pytest.approx(s["e2e_ms"]["median"], rel=0.05)
        assert s["tpot_ms"]["median"] is None  # no per-token times without a stream


def test_compare_gateway_with_engine_interleaved(engine_url: str, tmp_path: Path):
    gateway = start_gateway(tmp_path, engine_url)
    try:
        out_json = tmp_path / "compare.json"
        run = _cli("bench", gateway.url, "--compare", engine_url, "--name", "gateway",
                   "--compare-name", "direct", "--concurrency", "1,2", "--rounds", "2",
                   "--num-prompts", "4", "--output-len", "8", "--warmup", "1",
                   "--json", str(out_json))
    finally:
        gateway.stop()
    assert run.returncode == 0, run.stderr
    result = json.loads(out_json.read_text())
    by = {(s["load"], s["target"]): s for s in result["results"]}
    assert set(by) == {(c, t) for c in ("c=1", "c=2") for t in ("gateway", "direct")}
    for s in by.values():
        _assert_consistent(s, requests=2 * 4, output_len=8)  # 2 rounds of 4
    assert [r["load"] for r in result["ratios"]] == ["c=1", "c=2"]
    for r in result["ratios"]:
        gw, direct = by[(r["load"], "gateway")], by[(r["load"], "direct")]
        assert r["of"] == "gateway/direct"
        assert r["output_throughput"] == pytest.approx(
            gw["output_throughput"] / direct["output_throughput"]
        )
        assert r["ttft_median"] == pytest.approx(
            gw["ttft_ms"]["median"] / direct["ttft_ms"]["median"]
        )
    assert "gateway/direct" in run.stdout


def test_cmrc_questions_against_engine(engine_url: str, tmp_path: Path):
    out_json = tmp_path / "cmrc.json"
    run = _cli("bench", engine_url, "--dataset", "cmrc", "--dataset-path", str(CMRC),
               "--num-prompts", "3", "--output-len", "4", "--warmup", "0", "--json", str(out_json))
    assert run.returncode == 0, run.stderr
    [summary] = json.loads(out_json.read_text())["results"]
    _assert_consistent(summary, requests=3, output_len=4)
    assert summary["prompt_tokens"] > 3 * 100  # a paragraph each, not just the question


def test_datasets(tmp_path: Path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me about Paris."},
                           {"from": "gpt", "value": "x" * 400}]},
        {"conversations": [{"from": "gpt", "value": "no human turn first"}]},
    ]))
    prompts = datasets.sharegpt_prompts(sharegpt, 3, None)
    assert [(p.text, p.max_tokens) for p in prompts] == [("Tell me about Paris.", 100)] * 3
    assert datasets.sharegpt_prompts(sharegpt, 1, 7)[0].max_tokens == 7
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetError, match="no conversations"):
        datasets.sharegpt_prompts(tmp_path / "empty.json", 1, None)
    with pytest.raises(DatasetError, match="not valid JSON"):
        datasets.cmrc_prompts(Path(__file__), 1, 8)

    random_prompts = datasets.random_prompts(50, 100, 20, range_ratio=0.5, seed=1)
    assert len({p.text.split()[0] for p in random_prompts}) == 50  # distinct first words
    assert all(
        50 <= len(p.text.split()) <= 150 and 10 <= p.max_tokens <= 30 for p in random_prompts
    )
    assert datasets.random_prompts(5, 10, 5, seed=3) == datasets.random_prompts(5, 10, 5, seed=3)

    if CMRC.is_file():  # shared/ sits beside the repository, as in CI
        cmrc = datasets.cmrc_prompts(CMRC, 4, 16)
        assert len(cmrc) == 4 and all("根据上文回答" in p.text and p.max_tokens == 16 for p in cmrc)


def test_bad_input_is_a_clear_error(tmp_path: Path):
    cases = [
        (["bench", "127.0.0.1:18100"], "base URL"),
        (["bench", "http://127.0.0.1:9", "--concurrency", "a,b"], "numbers"),
        (["bench", "http://127.0.0.1:9", "--concurrency", "0"], "above 0"),
        (["bench", "http://127.0.0.1:9", "--api", "embeddings"], "chat or completions"),
        (["bench", "http://127.0.0.1:9", "--header", "nocolon"], "name: value"),
        (["bench", "http://127.0.0.1:9", "--model", "m", "--dataset", "nope"], "use one of"),
        (["bench", "http://127.0.0.1:9", "--model", "m", "--dataset", "sharegpt"],
         "--dataset-path"),
        (["bench", "http://127.0.0.1:9"], "is it up"),
        (["bench", "http://127.0.0.1:9", "--model", "m", "--dataset", "sharegpt",
          "--dataset-path", str(tmp_path / "missing.json")], "cannot read"),
    ]
    for args, message in cases:
        out = _cli(*args)
        assert out.returncode != 0, args
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr


def test_unreachable_endpoint_counts_errors():
    """A server that refuses connections is reported as errors, not a crash."""
    out = _cli("bench", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "3", "--warmup", "0")
    assert out.returncode == 0, out.stderr
    assert "ClientConnectorError" in out.stdout
    assert re.search(r"c=1 +127\.0\.0\.1:9 +0 +3", out.stdout)
