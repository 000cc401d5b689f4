"""The CPU engine as qwenstack starts it, against how it started it before (issue 16), and eager
against compiled: start time and streamed tokens/s at each concurrency.

Each variant is one vLLM server for the bundled SmolLM2-135M-Instruct (what `qwenstack up`
serves on a CPU with no --model), started, measured and stopped in turn; rounds alternate the
variants' order, so the machine's drift (other work on a shared box) falls on all alike.

    .venv/bin/python benchmarks/cpu_engine.py --home /tmp/engine-home --rounds 2 \\
        --variants before,compiled,eager --json cpu-engine.json

Variants (all with qwenstack's flags: model, dtype, context, KV-cache bytes, chunked prefill):
  before    as qwenstack launched CPU engines until issue 16: no LD_PRELOAD and no thread
            binding of ours (vLLM then preloads PyTorch's libgomp and binds one core of two,
            keeping the other for its scheduler), compiled (vLLM's default)
  compiled  today's launch (tcmalloc and Intel OpenMP preloaded, OpenMP threads on every
            core) with engine.cpu_eager false
  eager     today's launch as it is by default (--enforce-eager)
  eager-auto, compiled-auto   today's launch with vLLM's own thread binding (`auto`)

The engine venv and the model come from `--home` (made by `qwenstack up` or `qwenstack engine`
there first). Load: `qwenstack bench`'s generator (src/qwenstack/bench), /v1/completions,
streamed, random prompts of --input-len words, --output-len tokens each (ignore_eos).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwenstack import bench
from qwenstack.bench import datasets
from qwenstack.engine import hardware, launch, models
from qwenstack.engine.launch import EngineLaunch
from qwenstack.settings import load_settings

START_TIMEOUT_S = 900
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"engine.cpu_eager": False},  # and stripped below
    "compiled": {"engine.cpu_eager": False},
    "eager": {"engine.cpu_eager": True},
    "compiled-auto": {"engine.cpu_eager": False, "engine.cpu_threads_bind": "auto"},
    "eager-auto": {"engine.cpu_eager": True, "engine.cpu_threads_bind": "auto"},
}
# What the launch gained in issue 16, taken out again for `before`.
ADDED_ENV = ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND")


def engine_launch(home: Path, variant: str, port: int) -> EngineLaunch:
    settings = load_settings(home=home, **{"engine.base_port": port, **VARIANTS[variant]})
    machine = hardware.detect()
    python = home / "engine-venv" / "bin" / "python"
    [served] = settings.engine.served()
    model = models.resolve(served, settings, machine, python)
    [engine] = launch.build_launches(settings.engine, [model], machine, python, Path("/tmp"), [])
    if variant == "before":
        engine = replace(
            engine, env={k: v for k, v in engine.env.items() if k not in ADDED_ENV}, unset=(),
            argv=[a for a in engine.argv if a != "--enforce-eager"],
        )
    return engine


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start(engine: EngineLaunch, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = {k: v for k, v in os.environ.items() if k not in engine.unset} | engine.env
    started = time.monotonic()
    process = subprocess.Popen(
        engine.argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    while not _up(engine.url):
        if process.poll() is not None:
            raise RuntimeError(f"engine exited {process.returncode}; see {log}")
        if time.monotonic() - started > START_TIMEOUT_S:
            stop(process)
            raise TimeoutError(f"engine not up in {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.25)
    return process, time.monotonic() - started


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def measure(engine: EngineLaunch, name: str, args: argparse.Namespace) -> dict[str, float]:
    figures: dict[str, float] = {}
    target = bench.Target(name, engine.url)
    model = bench.served_model(target)
    for concurrency in args.concurrency:
        requests = max(args.min_requests, 2 * concurrency)
        prompts = datasets.random_prompts(
            requests + concurrency, args.input_len, args.output_len, seed=concurrency)
        [summary], _ = bench.benchmark(
            [target], prompts, [bench.Load(concurrency=concurrency)],
            bench.RequestOptions(model=model, api="completions"),
            requests_per_run=requests, warmup=concurrency,
        )
        if summary["errors"]:
            raise RuntimeError(f"{name} c={concurrency}: {summary['error_kinds']}")
        figures[f"c{concurrency}"] = summary["output_throughput"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--variants", default="before,compiled,eager")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=18190)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = args.variants.split(",")
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else variants[::-1]:
            engine = engine_launch(args.home, name, args.port)
            log = args.home / "logs" / f"bench-{name}-{round_}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            load_before = load_average()
            process, start_s = start(engine, log)
            try:
                figures = measure(engine, name, args)
            finally:
                stop(process)
            run = {"variant": name, "round": round_, "start_s": start_s, **figures,
                   "load_at_start": load_before, "load_at_end": load_average()}
            runs.append(run)
            print(json.dumps(run), flush=True)
    print()
    print(table(runs, variants, args.concurrency))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "args": vars(args)}, default=str))


def table(runs: list[dict[str, Any]], variants: list[str], levels: list[int]) -> str:
    """Medians over rounds, and each variant's ratio to `before` (or the first variant)."""
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["variant"] == name)

    base = "before" if "before" in variants else variants[0]
    keys = ["start_s", *(f"c{c}" for c in levels)]
    head = ["variant", "start s", *(f"tok/s c={c}" for c in levels),
            *(f"ratio c={c}" for c in levels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in variants:
        cells = [name, *(f"{median(name, k):.1f}" for k in keys),
                 *(f"{median(name, f'c{c}') / median(base, f'c{c}'):.2f}" for c in levels)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
