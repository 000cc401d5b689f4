"""Capacity simulation, `qwenstack plan --rate`: the engine replicas and gateway workers that serve
a request rate within a time-to-first-token and an inter-token target.

One replica is simulated step by step as vLLM schedules (continuous batching, chunked prefill):
requests arrive at random (Poisson) with prompt and output lengths drawn from the given
ranges; each step decodes one token for every running sequence and prefills waiting prompts
within a token budget; a request is admitted while the KV cache holds its whole length (prompt
and output: no preemption) and `max_num_seqs` allows. A step takes the longer of reading the
weights and the running sequences' KV cache at the GPU's bandwidth (decode is memory-bound) and
computing its tokens at the GPU's peak (prefill is compute-bound), each at a realistic fraction
of the peak (MBU, MFU below), plus a fixed scheduling overhead. Replicas share the rate evenly
(the gateway's routing keeps their loads level), so N replicas meet the targets when one meets
them at 1/N of the rate; the fewest such N is searched for.

The gateway's workers follow from the events they relay: CPU per event and per request as
measured by benchmarks/relay_ceiling.py (benchmarks/RESULTS.md, "Relay ceiling"), each worker
kept at most GATEWAY_WORKER_LOAD busy.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import random
import re

from qwenstack.engine import capacity
from qwenstack.engine.deployment_plan import DeploymentPlan
from qwenstack.errors import SetupError

# Fractions of the GPU's peaks that vLLM reaches: memory bandwidth in decode steps (MBU) and
# tensor throughput in prefill (MFU); typical of published vLLM measurements on recent GPUs.
MBU = 0.7
MFU = 0.5
STEP_OVERHEAD_S = 0.002  # scheduling, sampling, detokenising: per step, whatever its size
MAX_BATCHED_TOKENS = 8192  # vLLM's default token budget per step with chunked prefill
# The gateway, from benchmarks/RESULTS.md ("Relay ceiling": one token per event, paced streams,
# less the requests' share; 1-token answers), on a quiet box; a loaded one read 30 and 1,000:
# CPU per relayed event, and per request (auth, limits, /tokenize, usage row, log).
GATEWAY_US_PER_EVENT = 22.0
GATEWAY_US_PER_REQUEST = 600.0
# A worker (one process, one core) busier than this queues events, which adds to the latency.
GATEWAY_WORKER_LOAD = 0.7
SIMULATED_REQUESTS = 1500
MAX_REPLICAS = 4096

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Token lengths drawn uniformly from [low, high] ("300", or "100-500")."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, what: str) -> Lengths:
        match = _RANGE.match(text)
        if not match:
            raise SetupError(f"--{what} {text}: give tokens as N or LOW-HIGH, e.g. 200-2000")
        low, high = int(match[1]), int(match[2] or match[1])
        if not 1 <= low <= high:
            raise SetupError(f"--{what} {text}: lengths are 1 or more, the lower one first")
        return cls(low, high)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low:,}" if self.low == self.high else f"{self.low:,}-{self.high:,}"


@dataclasses.dataclass(frozen=True)
class Workload:
    rate: float  # requests per second, all replicas together
    prompt: Lengths
    output: Lengths
    ttft_s: float  # target: 90 % of requests see their first token within this
    itl_s: float  # target: 90 % of requests get their tokens at least this often, on average
    stream_interval: int = 1  # tokens per streamed event (engine.stream_interval)


@dataclasses.dataclass(frozen=True)
class Engine:
    """One replica's speed, from the deployment plan."""

    weights_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    params: int
    bandwidth: float  # bytes/s reached (peak x MBU)
    flops: float  # FLOP/s reached (peak x MFU)
    max_num_seqs: int

    @classmethod
    def of(cls, plan: DeploymentPlan, max_num_seqs: int) -> Engine:
        gpu = plan.gpu
        if gpu.bandwidth_gb_s is None or gpu.tflops is None:
            raise SetupError(f"{gpu.name}: its bandwidth and TFLOPS are not known; name a GPU "
                             "from the table for a simulation")
        return cls(
            weights_bytes=plan.weights_bytes, kv_bytes_per_token=plan.kv_bytes_per_token,
            kv_tokens=plan.kv_tokens,
            params=plan.weights_bytes // capacity.DTYPE_BYTES[plan.dtype],
            bandwidth=gpu.bandwidth_gb_s * 1e9 * plan.gpu_count * MBU,
            flops=gpu.tflops * 1e12 * plan.gpu_count * MFU, max_num_seqs=max_num_seqs,
        )

    def step_s(self, context_tokens: int, tokens: int) -> float:
        """One step: read the weights and `context_tokens` of KV cache, compute `tokens`."""
        memory = (self.weights_bytes + context_tokens * self.kv_bytes_per_token) / self.bandwidth
        return STEP_OVERHEAD_S + max(memory, 2 * self.params * tokens / self.flops)


@dataclasses.dataclass(frozen=True)
class ReplicaRun:
    rate: float
    ttft_p50_s: float
    ttft_p90_s: float
    itl_p90_s: float
    output_tokens_s: float
    overloaded: bool  # the queue grew without bound: the rate is over the replica's capacity

    def meets(self, workload: Workload) -> bool:
        return (not self.overloaded and self.ttft_p90_s <= workload.ttft_s
                and self.itl_p90_s <= workload.itl_s)


def _p(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def simulate_replica(engine: Engine, workload: Workload, rate: float,
                     requests: int = SIMULATED_REQUESTS, seed: int = 0) -> ReplicaRun:
    """One replica at `rate` requests/s, step by step (the module's docstring says how)."""
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    for _ in range(requests):
        clock += rng.expovariate(rate)
        arrivals.append((clock, workload.prompt.draw(rng), workload.output.draw(rng)))
    first: list[float] = [0.0] * requests
    finished: list[float] = [0.0] * requests
    waiting: collections.deque[int] = collections.deque()
    prefilling: collections.deque[list[int]] = collections.deque()  # [request, prompt left]
    decoding: list[tuple[int, int]] = []  # heap of (the decode step it ends at, request)
    arrived = steps = reserved = context = done = 0
    now = 0.0
    while done < requests:
        while arrived < requests and arrivals[arrived][0] <= now:
            waiting.append(arrived)
            arrived += 1
        if not (waiting or prefilling or decoding):
            now = arrivals[arrived][0]
            continue
        if len(waiting) > requests // 4:  # far behind: the queue only grows from here
            return ReplicaRun(rate, math.inf, math.inf, math.inf, 0.0, overloaded=True)
        while waiting and len(prefilling) + len(decoding) < engine.max_num_seqs:
            _, prompt, output = arrivals[waiting[0]]
            if reserved + prompt + output > engine.kv_tokens:
                break
            reserved += prompt + output
            prefilling.append([waiting.popleft(), prompt])
        budget, prefill = max(0, MAX_BATCHED_TOKENS - len(decoding)), 0
        for entry in prefilling:
            take = min(entry[1], budget - prefill)
            entry[1] -= take
            prefill += take
        now += engine.step_s(context, len(decoding) + prefill)
        steps += 1
        context += len(decoding)  # each running sequence grew by its new token
        while decoding and decoding[0][0] <= steps:
            _, request = heapq.heappop(decoding)
            _, prompt, output = arrivals[request]
            finished[request] = now
            context -= prompt + output
            reserved -= prompt + output
            done += 1
        while prefilling and prefilling[0][1] == 0:  # prefilled: its first token is out
            request = prefilling.popleft()[0]
            _, prompt, output = arrivals[request]
            first[request] = now
            if output == 1:
                finished[request] = now
                reserved -= prompt + output
                done += 1
            else:
                context += prompt + 1
                heapq.heappush(decoding, (steps + output - 1, request))
    ttfts = sorted(first[i] - arrivals[i][0] for i in range(requests))
    itls = sorted((finished[i] - first[i]) / (arrivals[i][2] - 1)
                  for i in range(requests) if arrivals[i][2] > 1) or [0.0]
    tokens = sum(output for _, _, output in arrivals)
    return ReplicaRun(rate, _p(ttfts, 0.5), _p(ttfts, 0.9), _p(itls, 0.9),
                      tokens / (max(finished) - arrivals[0][0]), overloaded=False)


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    workload: Workload
    max_num_seqs: int
    replicas: int | None  # None: no number of replicas meets the targets
    replica: ReplicaRun | None  # one replica at its share of the rate
    alone: ReplicaRun  # one request at a time: the best any number of replicas can do
    gateway_cores: float
    gateway_workers: int

    def figures(self) -> list[tuple[str, str]]:
        w = self.workload

        def ms(seconds: float) -> str:
            return f"{seconds * 1000:,.0f} ms"

        rows = [
            ("workload", f"{w.rate:g} requests/s, prompts {w.prompt} tokens, answers "
                         f"{w.output} tokens"),
            ("targets (p90)", f"first token within {ms(w.ttft_s)}, a token every "
                              f"{ms(w.itl_s)} or faster"),
            ("sequences at once", f"up to {self.max_num_seqs} per replica while the KV cache "
                                  "holds their prompts and answers (for this workload's "
                                  f"requests: --max-num-seqs {self.max_num_seqs})"),
            ("one request alone", f"first token {ms(self.alone.ttft_p50_s)}, a token every "
                                  f"{ms(self.alone.itl_p90_s)}"),
        ]
        if self.replicas is None or self.replica is None:
            rows.append(("engine replicas", "none meets the targets: even alone a request is "
                         "slower; use a faster GPU, more GPUs per replica, or looser targets"))
        else:
            r = self.replica
            rows += [
                ("engine replicas", f"{self.replicas} (each {r.rate:.3g} requests/s)"),
                ("per replica", f"{r.output_tokens_s:,.0f} output tokens/s; first token "
                                f"{ms(r.ttft_p50_s)} median, {ms(r.ttft_p90_s)} p90; a token "
                                f"every {ms(r.itl_p90_s)} (p90)"),
            ]
        rows.append(("gateway workers", f"{self.gateway_workers} ({self.gateway_cores:.2f} "
                     f"cores: {GATEWAY_US_PER_EVENT:g} µs per event, "
                     f"{w.stream_interval} token(s) per event, {GATEWAY_US_PER_REQUEST:g} µs "
                     f"per request; each worker at most {GATEWAY_WORKER_LOAD:.0%} busy)"))
        return rows


def gateway_cores(workload: Workload) -> float:
    """CPU cores the gateway spends on the workload: per request, and per relayed event (the
    role event, the first token's, one per `stream_interval` tokens after it, the finish)."""
    events = 3 + math.ceil((workload.output.mean - 1) / workload.stream_interval)
    return workload.rate * (GATEWAY_US_PER_REQUEST + events * GATEWAY_US_PER_EVENT) / 1e6


def plan_capacity(plan: DeploymentPlan, workload: Workload, max_num_seqs: int = 256
                  ) -> CapacityPlan:
    if workload.rate <= 0 or workload.ttft_s <= 0 or workload.itl_s <= 0:
        raise SetupError("--rate, --ttft-ms and --itl-ms must be above 0")
    longest, served = workload.prompt.high + workload.output.high, min(plan.context,
                                                                      plan.longest_context)
    if longest > served:
        raise SetupError(f"the longest request ({longest:,} tokens, prompt and answer) is over "
                         f"the context served ({served:,} tokens): set --context")
    engine = Engine.of(plan, max_num_seqs)
    alone = simulate_replica(engine, workload, workload.rate * 1e-6, requests=50)
    cores = gateway_cores(workload)
    workers = max(1, math.ceil(cores / GATEWAY_WORKER_LOAD))
    if not alone.meets(workload):
        return CapacityPlan(workload, max_num_seqs, None, None, alone, cores, workers)

    def run(replicas: int) -> ReplicaRun:
        return simulate_replica(engine, workload, workload.rate / replicas)

    # Doubling to a count that meets the targets, then bisecting down to the fewest.
    low, high = 0, 1
    runs = {1: run(1)}
    while not runs[high].meets(workload):
        if high >= MAX_REPLICAS:
            return CapacityPlan(workload, max_num_seqs, None, None, alone, cores, workers)
        low, high = high, high * 2
        runs[high] = run(high)
    while high - low > 1:
        middle = (low + high) // 2
        runs[middle] = run(middle)
        low, high = (low, middle) if runs[middle].meets(workload) else (middle, high)
    return CapacityPlan(workload, max_num_seqs, high, runs[high], alone, cores, workers)
