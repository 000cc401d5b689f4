"""`qwenstack bench`: load generation against OpenAI-compatible endpoints, and its figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop

from qwenstack import console
from qwenstack.bench.datasets import Prompt
from qwenstack.bench.loadgen import Load, RequestOptions, Target, prompts_needed, run_interleaved
from qwenstack.bench.report import Slo, ratios, summarize
from qwenstack.errors import SetupError

__all__ = ["Load", "RequestOptions", "Slo", "Target", "benchmark", "prompts_needed", "served_model"]


def served_model(target: Target) -> str:
    """The first model the endpoint lists, for when none is named."""

    async def ask() -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            url = f"{target.base_url.rstrip('/')}/v1/models"
            async with http.get(url, headers=target.headers) as response:
                if response.status != 200:
                    raise SetupError(f"{url} answered {response.status}; pass --model")
                listed = (await response.json()).get("data") or []
        if not listed:
            raise SetupError(f"{url} lists no model; pass --model")
        return str(listed[0]["id"])

    try:
        return uvloop.run(ask())
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        raise SetupError(
            f"cannot list the models of {target.base_url} ({exc}); is it up?"
        ) from None


def benchmark(
    targets: Sequence[Target],
    prompts: Sequence[Prompt],
    loads: Sequence[Load],
    options: RequestOptions,
    *,
    requests_per_run: int,
    rounds: int = 1,
    warmup: int = 0,
    slo: Slo | None = None,
    timeout_s: float = 600,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Summaries per (load, target), and each target's ratios to the last one (the baseline)."""
    with console.progress() as shown:  # requests done of all, on a terminal
        runs = uvloop.run(run_interleaved(
            targets, prompts, loads, options, requests_per_run=requests_per_run, rounds=rounds,
            warmup=warmup, timeout_s=timeout_s, seed=seed, progress=shown,
        ))
    summaries, all_ratios = [], []
    for per_target in runs:
        figures = [summarize(run, slo or Slo()) for run in per_target]
        summaries += figures
        all_ratios += [ratios(f, figures[-1]) for f in figures[:-1]]
    return summaries, all_ratios
