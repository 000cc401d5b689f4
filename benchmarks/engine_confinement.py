"""CPU engines confined to their own cores against left free (`engine.cpu_confine`, issue 16).

--replicas replicas of one model (3 by default: on 2 cores, more engines than cores), each
one's OpenMP threads bound as qwenstack binds them (cores shared round-robin when there are
fewer). `confined` runs all of each replica's processes (API server, EngineCore, worker) on its
cores only, as `engine.cpu_confine` does; `free` leaves them where the kernel puts them (the
default). All replicas are loaded at once, at each concurrency, and the CPU time of their
process groups over the load is read from /proc: CPU-seconds per 1,000 tokens is what the
engines leave to everything else on the machine (the gateway, the UI, the tests), tokens/s
what they serve.

    .venv/bin/python benchmarks/engine_confinement.py --home ~/.cache/qwenstack \\
        --model ~/.cache/qwenstack/models/tiny-qwen3 --rounds 2 --json confinement.json

The engine venv comes from `--home` (`qwenstack up` or `qwenstack engine` there first), the
model from `--model` (a folder: `qwenstack test-model` prints the tiny Qwen3's). Rounds
alternate the variants' order. Load: `qwenstack bench`'s generator, /v1/completions, streamed,
random prompts of --input-len words, --output-len tokens each (ignore_eos).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cpu_engine import stop  # run as a script: this folder is on the path

from qwenstack import bench
from qwenstack.bench import datasets
from qwenstack.engine import hardware, launch, models
from qwenstack.engine.launch import EngineLaunch
from qwenstack.lifeline import ALL_CPUS
from qwenstack.processes import LIFELINE_SCRIPT
from qwenstack.settings import load_settings

START_TIMEOUT_S = 600
VARIANTS = ("confined", "free")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def replicas(home: Path, model: str, port: int, count: int) -> list[EngineLaunch]:
    settings = load_settings(home=home, **{
        "engine.base_port": port, "engine.model": model, "engine.served_model_name": "m",
        "engine.replicas": count, "engine.kv_cache_gib": 1, "engine.max_model_len": 1024,
        "engine.cpu_confine": True})
    machine = hardware.detect()
    python = home / "engine-venv" / "bin" / "python"
    [served] = settings.engine.served()
    resolved = models.resolve(served, settings, machine, python)
    return launch.build_launches(settings.engine, [resolved], machine, python, Path("/tmp"), [])


def start(engine: EngineLaunch, log: Path, cpus: tuple[int, ...], lifeline: int,
          ) -> subprocess.Popen[bytes]:
    """The engine started through lifeline.py, confined to `cpus` (all: empty), as qwenstack's
    supervisor starts it; `lifeline`: the read end of a pipe this process keeps open."""
    env = {k: v for k, v in os.environ.items() if k not in engine.unset} | engine.env
    return subprocess.Popen(
        [sys.executable, "-I", str(LIFELINE_SCRIPT), str(lifeline),
         ",".join(map(str, cpus)) or ALL_CPUS, str(engine.nice), *engine.argv],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        pass_fds=(lifeline,),
    )


def wait_up(engine: EngineLaunch, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine exited {process.returncode}")
        try:
            with urllib.request.urlopen(f"{engine.url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{engine.url} not up in {START_TIMEOUT_S} s")


def group_cpu_s(groups: set[int]) -> float:
    """CPU-seconds used so far by the live processes of these process groups."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def load_all(engines: list[EngineLaunch], concurrency: int, args: argparse.Namespace) -> float:
    """Every replica under the same load at once; returns their tokens/s together."""
    def one(engine: EngineLaunch) -> float:
        target = bench.Target(engine.url, engine.url)
        requests = max(args.min_requests, 2 * concurrency)
        prompts = datasets.random_prompts(
            requests + concurrency, args.input_len, args.output_len, seed=concurrency)
        [summary], _ = bench.benchmark(
            [target], prompts, [bench.Load(concurrency=concurrency)],
            bench.RequestOptions(model="m", api="completions"),
            requests_per_run=requests, warmup=concurrency,
        )
        if summary["errors"]:
            raise RuntimeError(f"{engine.url} c={concurrency}: {summary['error_kinds']}")
        return float(summary["output_throughput"])

    with ThreadPoolExecutor(len(engines)) as pool:
        return sum(pool.map(one, engines))


def measure(engines: list[EngineLaunch], groups: set[int], args: argparse.Namespace,
            ) -> dict[str, float]:
    figures: dict[str, float] = {}
    for concurrency in args.concurrency:
        cpu_before, started = group_cpu_s(groups), time.monotonic()
        tokens_per_s = load_all(engines, concurrency, args)
        seconds, cpu_s = time.monotonic() - started, group_cpu_s(groups) - cpu_before
        figures[f"tok_s_c{concurrency}"] = tokens_per_s
        # The warm-up's tokens are in the CPU time, not in tokens/s: per 1,000 tokens counts
        # the measured ones only, so it is the same overstatement for both variants.
        figures[f"cpu_s_per_1k_c{concurrency}"] = 1000 * cpu_s / (tokens_per_s * seconds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=18190)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engines = replicas(args.home, str(Path(args.model).expanduser()), args.port, args.replicas)
    confined = [engine.cpus for engine in engines]
    # One progress bar per replica's load, from threads, cannot share a terminal: none.
    os.environ["TERM"] = "dumb"
    lifeline, _ = os.pipe()  # the write end closes when this process ends: so do the engines
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for name in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            logs = [args.home / "logs" / f"confinement-{name}-{round_}-{e.index}.log"
                    for e in engines]
            logs[0].parent.mkdir(parents=True, exist_ok=True)
            processes = [start(engine, log, cpus if name == "confined" else (), lifeline)
                         for engine, log, cpus in zip(engines, logs, confined, strict=True)]
            try:
                for engine, process in zip(engines, processes, strict=True):
                    wait_up(engine, process)
                figures = measure(engines, {p.pid for p in processes}, args)
            finally:
                for process in processes:
                    stop(process)
            runs.append({"variant": name, "round": round_, **figures})
            print(json.dumps(runs[-1]), flush=True)
    print()
    print(table(runs, args.concurrency))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "args": vars(args)}, default=str))


def table(runs: list[dict[str, Any]], levels: list[int]) -> str:
    """Medians over rounds, and `confined`'s ratio to `free`."""
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["variant"] == name)

    keys = [f"{kind}_c{c}" for c in levels for kind in ("tok_s", "cpu_s_per_1k")]
    head = ["variant", *(f"{'tok/s' if k.startswith('tok') else 'CPU-s/1k tok'} "
                         f"c={k.rsplit('c', 1)[1]}" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in VARIANTS:
        lines.append("| " + " | ".join([name, *(f"{median(name, k):.2f}" for k in keys)]) + " |")
    lines.append("| confined / free | " + " | ".join(
        f"{median('confined', k) / median('free', k):.2f}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
