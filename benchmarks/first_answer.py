"""Time to the first answer: `scripts/up` from a fresh clone and an empty home until the gateway
answers a chat request, then again from the same clone and home (a warm restart).

    .venv/bin/python benchmarks/first_answer.py --commit HEAD --work /tmp/first-answer \\
        [--sequential] [--rounds 1]

Each round clones the repository at --commit into a new folder, gives `scripts/up` a new empty
QWENSTACK_HOME, and polls `POST /v1/chat/completions` through the gateway (with the admin key the
first start saves) until it answers 200; then stops `up` (SIGTERM), starts it again and times the
same. pip's own download and wheel cache (~/.cache/pip) is left as it is: the figures are for a
machine whose pip has fetched these packages before, not for a first download. vLLM's and
PyTorch's compile caches start empty (in the home). With --apt-remove, Debian's tcmalloc is
removed first, so that the engine install installs it again as on a fresh machine.

--sequential takes the early engine install (engine/bootstrap.py, which installed the engine
venv beside qwenstack's own; commit 7ec961b) out of the clone's scripts/up, to measure what
installing side by side gained: nothing on 2 cores (benchmarks/RESULTS.md), so it was taken
out of the repository again. Gateway, engine and UI listen on
ports of their own (--port), so a stack on the default ports may keep running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1800
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def answered(gateway: str, key_file: Path) -> bool:
    if not key_file.is_file():
        return False
    request = urllib.request.Request(
        f"{gateway}/v1/chat/completions", data=json.dumps(QUESTION).encode(),
        headers={"content-type": "application/json", "cache-control": "no-cache",
                 "authorization": f"Bearer {key_file.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
            return bool(response.status == 200 and body["choices"][0]["message"]["content"])
    except (OSError, ValueError, KeyError, urllib.error.HTTPError):
        return False


def time_up(clone: Path, home: Path, port: int, log: Path) -> float:
    """Seconds from `scripts/up` to the first answer; `up` is stopped before returning."""
    env = {
        **os.environ, "QWENSTACK_HOME": str(home), "QWENSTACK_UI__PORT": str(port + 8),
        # vLLM's and PyTorch's compile caches, empty on a fresh machine: in the home here.
        "VLLM_CACHE_ROOT": str(home / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor-cache"),
    }
    started = time.monotonic()
    process = subprocess.Popen(
        ["scripts/up", "--port", str(port), "--engine-base-port", str(port + 10)],
        cwd=clone, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while not answered(f"http://127.0.0.1:{port}", home / "secrets" / "admin-key"):
            if process.poll() is not None:
                raise RuntimeError(f"scripts/up exited {process.returncode}; see {log}")
            if time.monotonic() - started > TIMEOUT_S:
                raise TimeoutError(f"no answer in {TIMEOUT_S} s; see {log}")
            time.sleep(0.5)
        return time.monotonic() - started
    finally:
        # The whole group: the early engine install too, were it still running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--work", type=Path, required=True, help="Clones and homes go here.")
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--apt-remove", action="store_true")
    parser.add_argument("--port", type=int, default=18400)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.commit],
                                 capture_output=True, text=True, check=True).stdout.strip()
    for round_ in range(args.rounds):
        name = f"{args.commit[:12]}{'-seq' if args.sequential else ''}-{round_}-{int(time.time())}"
        clone, home, log = (args.work / f"clone-{name}", args.work / f"home-{name}",
                            args.work / f"{name}.log")
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.commit], check=True)
        if args.sequential:
            up = clone / "scripts" / "up"
            up.write_text("".join(
                "  :  # the early engine install, taken out (--sequential)\n"
                if "bootstrap.py" in line and line.rstrip().endswith("&") else line
                for line in up.read_text().splitlines(keepends=True)))
        if args.apt_remove:
            subprocess.run(["apt-get", "remove", "-y", "-q", "libtcmalloc-minimal4"],
                           check=True, stdout=subprocess.DEVNULL)
        load = load_average()
        fresh = time_up(clone, home, args.port, log)
        load_after = load_average()
        warm = time_up(clone, home, args.port, log)
        print(json.dumps({"commit": args.commit, "sequential": args.sequential, "round": round_,
                          "fresh_s": round(fresh, 1), "warm_s": round(warm, 1),
                          "load_before": load, "load_after_fresh": load_after,
                          "load_after_warm": load_average(), "log": str(log)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
