"""How much load `qwenstack bench` itself can drive: against a trivial local streaming server.

Starts a minimal OpenAI-style SSE server in a second process (aiohttp on uvloop; it answers
every request at once with `max_tokens` one-token events, then the usage event and [DONE]),
and runs the bench's load generator against it at rising concurrency. Prints requests/s,
events (tokens)/s, and the generator's own CPU time per token event, which is what bounds it:
at 1 / (CPU per event) events/s one core is saturated.

    .venv/bin/python benchmarks/loadgen_ceiling.py [--tokens 64] [--concurrency 1 8 32 128]

The server shares the machine (and on a 2-core box, the cores) with the generator, so the
rates are a floor of the generator's ceiling; CPU per event is the figure to compare.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
import uvloop

from qwenstack import bench
from qwenstack.bench import datasets, loadgen


def serve(port: int, events_per_write: int) -> None:
    from aiohttp import web

    token = b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'

    async def completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        tokens = int(body.get("max_tokens") or 16)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, tokens, events_per_write):
            await response.write(token * min(events_per_write, tokens - start))
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}
        await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "trivial"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="events per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=2000, help="per level")
    parser.add_argument("--events-per-write", type=int, default=1,
                        help="server side: 1 sends each token in its own write, as vLLM does")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.events_per_write)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port),
                               "--events-per-write", str(args.events_per_write)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        target = bench.Target("trivial", url)
        options = bench.RequestOptions(model="trivial", api="completions")
        print(f"{'conc':>5} {'req/s':>8} {'events/s':>10} {'gen CPU us/event':>17} {'errors':>6}")
        for concurrency in args.concurrency:
            prompts = datasets.random_prompts(args.requests, 8, args.tokens)
            cpu = time.process_time()
            [[run]] = uvloop.run(loadgen.run_interleaved(
                [target], prompts, [bench.Load(concurrency=concurrency)], options,
                requests_per_run=args.requests,
            ))
            cpu = time.process_time() - cpu
            events = sum(len(r.token_times) for r in run.records)
            errors = sum(r.error is not None for r in run.records)
            print(f"{concurrency:>5} {len(run.records) / run.duration:>8.0f}"
                  f" {events / run.duration:>10.0f}"
                  f" {cpu / max(events, 1) * 1e6:>17.1f} {errors:>6}", flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
