"""`qwenstack bench`: flags in, a load test against one or two endpoints, figures out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwenstack.cli.common import fail
from qwenstack.errors import SetupError


def bench(
    url: Annotated[str, typer.Argument(
        help="Base URL of an OpenAI-compatible server (gateway or vLLM).")],
    compare: Annotated[str | None, typer.Option(
        help="A second base URL, run interleaved with the first; reports first/second ratios.",
    )] = None,
    name: Annotated[str | None, typer.Option(help="Label of URL. Default: host:port.")] = None,
    compare_name: Annotated[str | None, typer.Option(help="Label of --compare.")] = None,
    model: Annotated[str | None, typer.Option(help="Default: the first the server lists.")] = None,
    api: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    dataset: Annotated[str, typer.Option(help="random, sharegpt or cmrc.")] = "random",
    dataset_path: Annotated[Path | None, typer.Option(
        help="sharegpt: a ShareGPT-style JSON file; cmrc: default "
        "../shared/data/cmrc2018_trial.json.")] = None,
    num_prompts: Annotated[int, typer.Option(
        help="Requests per load level, target and round.")] = 32,
    input_len: Annotated[int, typer.Option(help="random: prompt words (about tokens).")] = 128,
    output_len: Annotated[int | None, typer.Option(
        help="Tokens to generate (max_tokens). Default 64; sharegpt: the recorded reply's length.",
    )] = None,
    range_ratio: Annotated[float, typer.Option(
        help="random: lengths uniform in len x [1-r, 1+r].")] = 0.0,
    concurrency: Annotated[str | None, typer.Option(
        help="Fixed concurrency sweep, e.g. 1,8,32.")] = None,
    rate: Annotated[str | None, typer.Option(
        help="Poisson request rate sweep (req/s), e.g. 1,2,inf.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        help="With --rate: cap on requests in flight.")] = None,
    rounds: Annotated[int, typer.Option(
        help="Runs per load level and target; the order alternates.")] = 1,
    warmup: Annotated[int, typer.Option(help="Unmeasured requests per target first.")] = 2,
    slo_ttft_ms: Annotated[float | None, typer.Option(
        help="Goodput: time to first token at most.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(
        help="Goodput: time per output token at most.")] = None,
    slo_e2e_ms: Annotated[float | None, typer.Option(
        help="Goodput: whole request at most.")] = None,
    header: Annotated[list[str] | None, typer.Option(
        help="Extra header 'name: value' (repeatable).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="QWENSTACK_KEY", help="Bearer key.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default: the model's.")] = None,
    stream: Annotated[bool, typer.Option(help="Streamed answers (TTFT, ITL need them).")] = True,
    ignore_eos: Annotated[bool, typer.Option(help="vLLM: always generate max_tokens.")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the figures as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write latency/throughput against load as PNG.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 600.0,
) -> None:
    """Load-test an OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, goodput, errors."""
    # Over 60 lines: one parameter per flag; the body itself is short.
    from qwenstack import bench as bench_
    from qwenstack.bench import datasets, report
    from qwenstack.bench.options import OptionError, RunOptions, run_config

    try:
        run = run_config(RunOptions(
            url, compare=compare, name=name, compare_name=compare_name, api=api,
            concurrency=concurrency, rate=rate, max_concurrency=max_concurrency,
            num_prompts=num_prompts, rounds=rounds, warmup=warmup, timeout=timeout,
            header=tuple(header or ()), api_key=api_key,
        ))
    except OptionError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.flag) from None
    count = bench_.prompts_needed(len(run.targets), len(run.loads), rounds, num_prompts, warmup)
    try:
        prompts = datasets.load(
            dataset, count, path=dataset_path, input_len=input_len, output_len=output_len,
            range_ratio=range_ratio, seed=seed,
        )
        options = bench_.RequestOptions(
            model=model or bench_.served_model(run.targets[0]), api=run.api, stream=stream,
            ignore_eos=ignore_eos, temperature=temperature,
        )
        slo = report.Slo(slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
        summaries, ratios = bench_.benchmark(
            run.targets, prompts, run.loads, options, requests_per_run=num_prompts, rounds=rounds,
            warmup=warmup, slo=slo, timeout_s=timeout, seed=seed,
        )
        typer.echo(report.table(summaries))
        if ratios:
            typer.echo("\n" + report.ratio_table(ratios))
        if json_out:
            meta = {"model": options.model, "api": api, "dataset": dataset,
                    "num_prompts": num_prompts, "rounds": rounds, "stream": stream,
                     "slo": slo.__dict__,
                    "targets": {t.name: t.base_url for t in run.targets}}
            report.write_json(json_out, meta, summaries, ratios)
        if plot:
            report.plot(plot, summaries, run.load_label)
    except SetupError as exc:
        fail(exc)
