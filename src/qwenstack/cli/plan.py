"""`qwenstack plan`: size a deployment on GPUs this machine need not have."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from qwenstack.cli.common import ConfigOpt, fail, print_table, settings_for
from qwenstack.errors import SetupError

# Sequences an engine runs at once in a simulation (--rate) unless --concurrency says: vLLM's
# default --max-num-seqs on GPUs.
SIMULATED_MAX_NUM_SEQS = 256
# `qwenstack plan --help`. Not the docstring: a docstring wrapped over two lines would print
# over two lines.
HELP = (
    "Size a deployment: weights, KV cache, context and concurrency that fit, "
    "decode bound, flags."
)


def plan(
    gpu: Annotated[str, typer.Option(
        help="A GPU name (A10, L4, A100-80GB, H100 ...) or memory, e.g. 24GB.")],
    model: Annotated[str | None, typer.Argument(
        help="Hub id, local model folder, or a config.json file. Omitted: every model of "
        "--config's engine.models, on --gpu-count GPUs.")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs (tensor parallel).")] = 1,
    context: Annotated[int | None, typer.Option(
        help="Tokens per sequence. Default: the model's maximum.")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="Sequences at once (vLLM's --max-num-seqs). Default: 1; 256 with --rate.")] = None,
    dtype: Annotated[str, typer.Option(
        help="auto: bfloat16 where the GPU has it, else float16.")] = "auto",
    kv_cache_dtype: Annotated[str, typer.Option(
        help="auto (the weights' dtype) or fp8.")] = "auto",
    gpu_memory_utilization: Annotated[float, typer.Option()] = 0.9,
    rate: Annotated[float | None, typer.Option(
        help="Requests/s to serve: simulate, and size replicas and gateway workers.")] = None,
    prompt_tokens: Annotated[str, typer.Option(
        help="With --rate: prompt tokens, N or LOW-HIGH (uniform).")] = "1000",
    output_tokens: Annotated[str, typer.Option(
        help="With --rate: answer tokens, N or LOW-HIGH (uniform).")] = "300",
    ttft_ms: Annotated[float, typer.Option(
        help="With --rate: first token within this, for 90% of requests.")] = 2000,
    itl_ms: Annotated[float, typer.Option(
        help="With --rate: a token at least this often, for 90% of requests.")] = 50,
    stream_interval: Annotated[int, typer.Option(
        help="With --rate: tokens per streamed event (engine.stream_interval).")] = 1,
    gpu_count: Annotated[int | None, typer.Option(
        help="GPUs of this kind in all, for the models of --config (engine.models).")] = None,
    config: ConfigOpt = None,
) -> None:
    # The help text is HELP, given where the command is registered.
    from qwenstack.engine import deployment_plan, gpu_catalog, serving_simulation

    if model is None:
        _plan_served_models(gpu, gpu_count, config)
        return
    # A bare config.json names no model vLLM could load: leave the flag for the user to fill.
    served = "MODEL_FOLDER_OR_HUB_ID" if Path(model).is_file() else model
    if concurrency is None:
        concurrency = 1 if rate is None else SIMULATED_MAX_NUM_SEQS
    try:
        chosen = gpu_catalog.lookup(gpu)
        sized = deployment_plan.plan_deployment(
            served, deployment_plan.read_model_config(model, os.environ.get("HF_TOKEN")),
            chosen, gpu_count=gpus, context=context, concurrency=concurrency,
            dtype=dtype, kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
        )
    except SetupError as exc:
        fail(exc)
    print_table(sized.figures())
    if sized.refusal:
        typer.secho(f"\nDoes not fit: {sized.refusal}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.echo("\nvLLM flags:  " + " ".join(sized.vllm_flags()))
    if rate is None:
        return
    try:
        workload = serving_simulation.Workload(
            rate, serving_simulation.Lengths.parse(prompt_tokens, "prompt-tokens"),
            serving_simulation.Lengths.parse(output_tokens, "output-tokens"),
            ttft_ms / 1000, itl_ms / 1000, stream_interval)
        if stream_interval < 1:
            raise SetupError("--stream-interval must be 1 or more")
        capacity = serving_simulation.plan_capacity(sized, workload, sized.concurrency)
    except SetupError as exc:
        fail(exc)
    typer.echo("\nSimulated serving (method: README, \"Capacity planning\"):")
    print_table(capacity.figures())
    if capacity.replicas is None:
        raise typer.Exit(1)


def _plan_served_models(gpu: str, gpu_count: int | None, config: Path | None) -> None:
    """Each model of the settings' engine.models on its replicas' GPUs, then the set of them
    on --gpu-count GPUs; refused (exit 1) where a model or the set does not fit."""
    from qwenstack.engine import deployment_plan, gpu_catalog

    settings = settings_for(config)
    served = settings.engine.served()
    token = settings.engine.hf_token
    try:
        plans, refusal = deployment_plan.plan_served_models(
            served, gpu_catalog.lookup(gpu), gpu_count or 1,
            token.get_secret_value() if token else None)
    except SetupError as exc:
        fail(exc)
    refusals = []
    for (name, sized), entry in zip(plans, served, strict=True):
        typer.echo(f"\n{name} ({entry.role}): {entry.replicas} replicas, each on "
                   f"{entry.tensor_parallel_size} GPU(s)")
        print_table(sized.figures())
        if sized.refusal:
            refusals.append(f"{name}: {sized.refusal}")
    if refusal:
        refusals.append(refusal)
    if refusals:
        typer.secho("\nDoes not fit: " + "\n".join(refusals), err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    needed = sum(entry.replicas * entry.tensor_parallel_size for entry in served)
    typer.echo(f"\nFits: {needed} of {gpu_count or 1} GPUs.")
