"""Start-up of a two-model stack against each of its models alone: `qwenstack up` until its
ready banner, the engines' own ready times read from the log.

    .venv/bin/python benchmarks/models_startup.py --home /tmp/models-startup --rounds 2

Variants, each `qwenstack up` with the answer cache and the UI off, `--kv-cache-gib 1` and
`--max-model-len 1024` for every engine:
  tiny      the tiny random-weight Qwen3 the tests use (`qwenstack test-model`), alone
  smollm2   the bundled SmolLM2-135M-Instruct (what `up` serves on a CPU by default), alone
  both      the two from one `engine.models` list, an engine each, started at once

Rounds alternate the variants' order, so the drift of a shared machine falls on all alike.
The engine venv and the models come from ~/.cache/qwenstack (made there by `scripts/up` or
`qwenstack test-model` first), linked into --home; the rest of the home is new each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED_HOME = Path.home() / ".cache" / "qwenstack"
TIMEOUT_S = 900
READY = "qwenstack is ready."
ENGINE_READY = re.compile(r"Engine (\d+) (\S+): ready \((\d+) s\)")


def variants(tiny: str) -> dict[str, list[dict[str, str]]]:
    return {
        "tiny": [{"model": tiny, "served_model_name": "tiny-qwen3"}],
        "smollm2": [{"served_model_name": "smollm2"}],
        "both": [{"model": tiny, "served_model_name": "tiny-qwen3"},
                 {"served_model_name": "smollm2"}],
    }


def tiny_qwen3() -> str:
    out = subprocess.run([sys.executable, "-m", "qwenstack", "test-model"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_up(home: Path, models: list[dict[str, str]], port: int) -> dict[str, Any]:
    """One `qwenstack up` in a new home: seconds to its ready banner, each engine's ready."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    for shared in ("engine-venv", "models"):
        (home / shared).symlink_to(SHARED_HOME / shared)
    log = home / "up.log"
    env = {**os.environ, "QWENSTACK_ENGINE__MODELS": json.dumps(models),
           "QWENSTACK_CACHE__ENABLED": "false", "QWENSTACK_UI__ENABLED": "false",
           "QWENSTACK_OBSERVABILITY__LOG_FORMAT": "text"}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "qwenstack", "up", "--home", str(home), "--port", str(port),
         "--engine-base-port", str(port + 1), "--kv-cache-gib", "1", "--max-model-len", "1024"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        while READY not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"up exited {process.returncode}; see {log}")
            if time.monotonic() - started > TIMEOUT_S:
                raise TimeoutError(f"not ready in {TIMEOUT_S} s; see {log}")
            time.sleep(0.25)
        ready_s = time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    engines = {model: int(seconds) for _, model, seconds
               in ENGINE_READY.findall(log.read_text(errors="replace"))}
    return {"ready_s": ready_s, "engines_ready_s": engines}


def table(runs: list[dict[str, Any]], names: list[str]) -> str:
    def median(name: str) -> float:
        return statistics.median(r["ready_s"] for r in runs if r["variant"] == name)

    lines = ["| stack | ready (median s) | runs (s) | engines ready, own clock (s) | "
             "against the slower model alone |", "|---|---:|---|---|---:|"]
    alone = max(median(name) for name in names if name != "both")
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        runs_s = ", ".join(f"{r['ready_s']:.1f}" for r in mine)
        engines = "; ".join(", ".join(f"{m} {s}" for m, s in r["engines_ready_s"].items())
                            for r in mine)
        lines.append(f"| {name} | {median(name):.1f} | {runs_s} | {engines} | "
                     f"{median(name) / alone:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="tiny,smollm2,both")
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stacks = variants(tiny_qwen3())
    names = args.variants.split(",")
    runs = []
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            load = load_average()
            run = {"variant": name, "round": round_, "load_at_start": load,
                   **start_up(args.home / name, stacks[name], args.port)}
            run["load_at_end"] = load_average()
            runs.append(run)
            print(json.dumps(run), flush=True)
    print()
    print(table(runs, names))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "args": vars(args)}, default=str))


if __name__ == "__main__":
    sys.exit(main())
