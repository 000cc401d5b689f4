"""The relay ceiling: the gateway's CPU per relayed token and per request, and the tokens/s one
core of it relays, against direct access and LiteLLM's proxy, in one run.

The engine is synthetic (`qwenstack.bench.synthetic_engine`: vLLM's chat stream byte for byte,
pre-built events, a set pace, no model), so the engine is never the limit. In front of it, side
by side, each its own process:

- `gateway`: `qwenstack gateway` as deployed, with everything on: the API key checked, limits
  (requests, tokens (counted by the engine's /tokenize) and concurrency per key, set too high to
  refuse), metrics, usage rows (SQLite), the per-request log line, and the answer cache's copy
  of each answer (temperature 0 with `cache-control: no-cache`: relayed and stored, never
  served from the cache);
- `litellm`: LiteLLM's proxy (`LITELLM` below, in a venv this script makes once) with a master
  key, routing to the same engine as `hosted_vllm`;
- `direct`: the engine itself.

Each level runs every target in rounds whose order alternates (as `qwenstack bench --compare`
does), the load from `qwenstack bench`'s generator (chat, streamed, usage asked). The CPU
figures are each process's own CPU time (/proc: user + system, its children included) over
the run, divided by the tokens (events' content, as the usage events count them) or requests
answered. "tokens/s per core" is tokens over the proxy's CPU seconds: what one core relays when
the proxy is the limit.

    .venv/bin/python benchmarks/relay_ceiling.py                     # a few minutes
    .venv/bin/python benchmarks/relay_ceiling.py --write-results     # and into RESULTS.md
    .venv/bin/python benchmarks/relay_ceiling.py --levels paced --rounds 1 --no-litellm  # smoke
    .venv/bin/python benchmarks/relay_ceiling.py --baseline ../before/src   # a change, measured
                                               # against the gateway of another checkout
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import uvloop
from gateway_overhead import free_port, ready

from qwenstack.bench import Load, RequestOptions, Target, datasets, loadgen
from qwenstack.bench.synthetic_engine import MODEL, PACE_PATH

# The last release before the compromised 1.107.0 (withdrawn from PyPI); its proxy ships inside
# the package (1.110's `proxy` extra needs a separate `litellm-proxy`).
LITELLM = "litellm[proxy]==1.106.12"
RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- relay_ceiling: begin -->", "<!-- relay_ceiling: end -->"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    concurrency: int
    tokens_per_s: float  # per stream; 0: as fast as the engine writes
    max_tokens: int
    stream_interval: int = 1
    requests: int = 0  # per round and target; 0: 2 x the concurrency
    without_litellm: bool = False  # the gateway and direct only (LiteLLM left out)

    @property
    def per_run(self) -> int:
        return self.requests or 2 * self.concurrency


LEVELS = {
    # Per request: answers of one token, so nearly all the proxy's work is per request.
    "request": Level("1-token answers", 32, 0, 1, requests=256),
    # Per token as a GPU engine streams: each stream gets an event every 20 ms, one at a time,
    # so the proxy relays events one by one (nothing to coalesce).
    "paced": Level("64 streams x 50 tok/s", 64, 50, 128),
    # Saturation: the engine writes back to back; the proxy is the limit.
    "saturation": Level("saturation, 256-token answers", 64, 0, 256),
    # vLLM's --stream-interval: tokens per event, the same tokens/s.
    "interval4": Level("64 x 50 tok/s, 4 tokens/event", 64, 50, 128, 4, without_litellm=True),
    "interval16": Level("64 x 50 tok/s, 16 tokens/event", 64, 50, 128, 16, without_litellm=True),
}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its living descendants, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            # utime, stime, and cutime, cstime: children it has waited for
            total += sum(int(v) for v in stats[current][11:15])
        todo += children.get(current, [])
    return total / CLOCK_TICKS


def wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{url} did not come up")
            time.sleep(0.2)


def litellm_venv(folder: Path) -> Path:
    """LiteLLM's proxy in a venv of its own (its pins clash with qwenstack's); made once."""
    executable = folder / "bin" / "litellm"
    if not executable.exists():
        print(f"installing {LITELLM} into {folder} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "--no-compile", LITELLM],
                       check=True)
    return executable


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[str, list[Target], dict[str, int]]]:
    """The synthetic engine, the gateway and LiteLLM, each its own process: the engine's URL,
    the targets, and the process id to read each one's CPU from."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="relay-ceiling-") as tmp:
        home, logs = Path(tmp), Path(tmp) / "logs"
        logs.mkdir()

        def start(name: str, command: list[str], env: dict[str, str] | None = None
                  ) -> subprocess.Popen[bytes]:
            log = (logs / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, **(env or {})}))
            return procs[-1]

        try:
            port = free_port()
            engine_url = f"http://127.0.0.1:{port}"
            engine = start("engine", [sys.executable, "-m", "qwenstack.bench.synthetic_engine",
                                      "--port", str(port)])
            wait_for(f"{engine_url}/health", engine)
            pids, targets = {"engine": engine.pid}, []

            for name, source in (("gateway", None), ("baseline", args.baseline)):
                if name == "gateway" or source:
                    pids[name], target = start_gateway(name, source, engine_url, home / name,
                                                       start)
                    targets.append(target)
            if args.workers > 1:
                name = f"gateway x{args.workers} workers"
                pids[name], target = start_gateway(name, None, engine_url, home / "workers",
                                                   start, args.workers)
                targets.append(target)

            if args.litellm:
                executable = litellm_venv(args.litellm_venv)
                master = "sk-bench-" + os.urandom(8).hex()
                config = home / "litellm.yaml"
                config.write_text(orjson.dumps({
                    "model_list": [{"model_name": MODEL, "litellm_params": {
                        "model": f"hosted_vllm/{MODEL}", "api_base": f"{engine_url}/v1",
                        "api_key": "none"}}],
                    "general_settings": {"master_key": master},
                    "litellm_settings": {"drop_params": True},
                }).decode())  # JSON is YAML
                port = free_port()
                litellm = start("litellm", [str(executable), "--config", str(config),
                                            "--host", "127.0.0.1", "--port", str(port)],
                                {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                                 "LITELLM_TELEMETRY": "False"})
                url = f"http://127.0.0.1:{port}"
                wait_for(f"{url}/health/liveliness", litellm)
                pids["litellm"] = litellm.pid
                targets.append(Target("litellm", url, {"authorization": f"Bearer {master}"}))
            targets.append(Target("direct", engine_url))
            yield engine_url, targets, pids
        finally:
            for process in procs:
                process.terminate()
            for process in procs:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


def start_gateway(
    name: str, source: Path | None, engine_url: str, home: Path,
    start: Callable[[str, list[str], dict[str, str] | None], subprocess.Popen[bytes]],
    workers: int = 1,
) -> tuple[int, Target]:
    """`qwenstack gateway` with a key of its own (limits set too high to refuse); `source`: the
    qwenstack source folder (a checkout's `src`) to run instead of this one; `workers` worker
    processes (their CPU counts as the gateway's: they are its children)."""
    env = {"PYTHONPATH": str(source)} if source else {}
    if workers > 1:
        # What more than one worker needs (gateway.workers): no per-process answer cache (this
        # benchmark never hits it anyway) and knowledge bases on a server (never contacted).
        env |= {"QWENSTACK_GATEWAY__WORKERS": str(workers), "QWENSTACK_CACHE__ENABLED": "false",
                "QWENSTACK_RAG__MILVUS_URI": "http://127.0.0.1:19530"}
    qwenstack = [sys.executable, "-m", "qwenstack"]
    key = subprocess.run(
        [*qwenstack, "keys", "create", "--name", "bench", "--home", str(home),
         "--rpm", "100000000", "--tpm", "100000000000", "--max-concurrency", "100000"],
        capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout.strip()
    port = free_port()
    gateway = start(name, [*qwenstack, "gateway", "--home", str(home), "--engine-url", engine_url,
                           "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not ready(url):
        if gateway.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name} did not come up")
        time.sleep(0.2)
    return gateway.pid, Target(name, url, {"authorization": f"Bearer {key}",
                                           "cache-control": "no-cache"})


def set_pace(engine_url: str, level: Level) -> None:
    body = orjson.dumps({"tokens_per_s": level.tokens_per_s,
                         "stream_interval": level.stream_interval})
    request = urllib.request.Request(engine_url + PACE_PATH, body, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


@dataclasses.dataclass
class Tally:
    """One target's runs at one level: the records, wall time, and CPU seconds of the target's
    own process (none for direct access), the engine's and the load generator's."""

    records: list[loadgen.RequestRecord] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    engine_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


@dataclasses.dataclass
class Row:
    level: str
    target: str
    requests: int
    errors: int
    tokens: int
    tokens_s: float
    cpu_s: float
    cores: float  # the target's CPU seconds per second
    us_per_token: float | None
    us_per_request: float | None
    tokens_s_per_core: float | None
    engine_us_per_token: float
    client_us_per_token: float
    itl_ms_median: float | None
    itl_ms_p99: float | None
    ttft_ms_median: float | None
    us_per_token_net: float | None = None  # less its requests' share (net_of_requests)

    @classmethod
    def of(cls, level: Level, target: str, tally: Tally) -> Row:
        records = [r for r in tally.records if r.error is None]
        tokens = sum(r.output_tokens for r in records) or 1
        itls = sorted(itl * 1000 for r in records for itl in r.itls())
        proxy = target != "direct"
        return cls(
            level=level.name, target=target, requests=len(records),
            errors=len(tally.records) - len(records), tokens=tokens,
            tokens_s=tokens / tally.wall_s, cpu_s=tally.cpu_s, cores=tally.cpu_s / tally.wall_s,
            us_per_token=tally.cpu_s / tokens * 1e6 if proxy else None,
            us_per_request=tally.cpu_s / max(1, len(records)) * 1e6 if proxy else None,
            tokens_s_per_core=tokens / tally.cpu_s if proxy and tally.cpu_s else None,
            engine_us_per_token=tally.engine_cpu_s / tokens * 1e6,
            client_us_per_token=tally.client_cpu_s / tokens * 1e6,
            itl_ms_median=statistics.median(itls) if itls else None,
            itl_ms_p99=itls[int(0.99 * (len(itls) - 1))] if itls else None,
            ttft_ms_median=statistics.median(r.ttft * 1000 for r in records) if records else None,
        )


async def measure(engine_url: str, targets: list[Target], pids: dict[str, int],
                  levels: list[Level], rounds: int) -> list[Row]:
    options = RequestOptions(model=MODEL, api="chat", temperature=0.0)
    rows: list[Row] = []

    def cpu_now(target: Target) -> tuple[float, float, float]:
        own = pids.get(target.name)
        return (tree_cpu_s(own) if own else 0.0, tree_cpu_s(pids["engine"]),
                time.process_time())

    async with loadgen.session(600) as http:
        for level in levels:
            set_pace(engine_url, level)
            chosen = [t for t in targets if not (level.without_litellm and t.name == "litellm")]
            prompts = iter(datasets.random_prompts(
                (rounds + 1) * len(chosen) * level.per_run, 16, level.max_tokens,
                seed=level.concurrency))
            load = Load(concurrency=level.concurrency)
            for target in chosen:  # warm-up: connections opened, caches filled, code paths hot
                await loadgen.run_load(http, target, [next(prompts) for _ in range(level.per_run)],
                                       load, options)
            tallies = {t.name: Tally() for t in chosen}
            for round_index in range(rounds):
                for target in chosen if round_index % 2 == 0 else chosen[::-1]:
                    before = cpu_now(target)
                    run = await loadgen.run_load(
                        http, target, [next(prompts) for _ in range(level.per_run)], load, options)
                    after = cpu_now(target)
                    tally = tallies[target.name]
                    tally.records += run.records
                    tally.wall_s += run.duration
                    tally.cpu_s += after[0] - before[0]
                    tally.engine_cpu_s += after[1] - before[1]
                    tally.client_cpu_s += after[2] - before[2]
            for name, tally in tallies.items():
                rows.append(Row.of(level, name, tally))
                print(row_text(rows[-1]), flush=True)
    return net_of_requests(rows)


def net_of_requests(rows: list[Row]) -> list[Row]:
    """Each row's CPU per token less its requests' share, where the 1-token level measured the
    CPU per request: what one more token of an answer costs."""
    per_request = {row.target: row.us_per_request for row in rows
                   if row.level == LEVELS["request"].name}
    for row in rows:
        fixed = per_request.get(row.target)
        if fixed is not None and row.us_per_token is not None and row.level != LEVELS[
                "request"].name:
            row.us_per_token_net = (row.cpu_s * 1e6 - row.requests * fixed) / row.tokens
    return rows


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


COLUMNS = ("level", "target", "ok", "err", "tok/s", "proxy cores", "**µs CPU / token**",
           "µs / token, less requests' share", "µs CPU / request", "tok/s per core",
           "engine µs/token", "ITL med ms", "ITL p99 ms", "TTFT med ms")


def row_cells(row: Row) -> list[str]:
    return [row.level, row.target, _n(row.requests), _n(row.errors), _n(row.tokens_s),
            _n(row.cores, 2), f"**{_n(row.us_per_token, 1)}**", _n(row.us_per_token_net, 1),
            _n(row.us_per_request), _n(row.tokens_s_per_core), _n(row.engine_us_per_token, 1),
            _n(row.itl_ms_median, 1), _n(row.itl_ms_p99, 1), _n(row.ttft_ms_median, 1)]


def row_text(row: Row) -> str:
    return "  ".join(row_cells(row)).replace("**", "")


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def write_results(table: str, args: argparse.Namespace, load: tuple[float, float]) -> None:
    """Replace the table between the markers in RESULTS.md (added at its end the first time)."""
    section = (f"{BEGIN}\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
               f"{args.rounds} rounds per level, load average {load[0]:.1f} before and "
               f"{load[1]:.1f} after:\n\n{table}\n{END}")
    text = RESULTS.read_text()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS))
    parser.add_argument("--rounds", type=int, default=2, help="per level; the order alternates")
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument("--workers", type=int, default=1,
                        help="also a gateway of this many worker processes (gateway.workers)")
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="also a gateway run from this qwenstack source folder (another "
                        "checkout's src), e.g. the commit before a change: before and after "
                        "in one run")
    home = Path(os.environ.get("QWENSTACK_HOME", Path.home() / ".cache" / "qwenstack"))
    parser.add_argument("--litellm-venv", type=Path, default=home / "bench" / "litellm-venv")
    parser.add_argument("--write-results", action="store_true",
                        help=f"put the table into {RESULTS.name}")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    levels = [LEVELS[name] for name in args.levels]
    load_before = os.getloadavg()[0]
    with servers(args) as (engine_url, targets, pids):
        rows = uvloop.run(measure(engine_url, targets, pids, levels, args.rounds))
    table = markdown(rows)
    print("\n" + table)
    if args.json:
        args.json.write_bytes(orjson.dumps([dataclasses.asdict(r) for r in rows],
                                           option=orjson.OPT_INDENT_2))
    if args.write_results:
        write_results(table, args, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
