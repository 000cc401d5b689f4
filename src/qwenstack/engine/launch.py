"""The command line and environment of each vLLM replica, checked before anything starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qwenstack.engine import capacity, cpu_tuning, families, lora, roles
from qwenstack.engine.hardware import Hardware
from qwenstack.engine.models import ResolvedModel
from qwenstack.errors import SetupError
from qwenstack.settings import ENGINE_HOST, EngineSettings
from qwenstack.settings.engine import ServedModelSettings

log = logging.getLogger(__name__)

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# Flags qwenstack sets itself; in extra_args they would silently fight its own values.
MANAGED_FLAGS = {
    "--model": "--model", "--served-model-name": "--served-model-name",
    "--host": "(engines always listen on 127.0.0.1)", "--port": "--engine-base-port",
    "--dtype": "--dtype", "--max-model-len": "--max-model-len",
    "--tensor-parallel-size": "--tensor-parallel-size", "-tp": "--tensor-parallel-size",
    "--gpu-memory-utilization": "--gpu-memory-utilization", "--max-num-seqs": "--max-num-seqs",
    "--enable-chunked-prefill": "--enable-chunked-prefill/--no-enable-chunked-prefill",
    "--no-enable-chunked-prefill": "--enable-chunked-prefill/--no-enable-chunked-prefill",
    "--kv-cache-memory-bytes": "--kv-cache-gib",
    "--stream-interval": "--stream-interval",
    "--allowed-media-domains": "validation.allowed_media_domains",
    "--enable-auto-tool-choice": "engine.tool_call_parser",
    "--tool-call-parser": "engine.tool_call_parser",
    "--reasoning-parser": "engine.reasoning_parser",
    **dict.fromkeys(lora.LORA_FLAGS, "engine.lora"),
}
# vLLM fetches media URLs from any host unless given --allowed-media-domains; with no domain
# allowed, this reserved name (RFC 2606: never resolves) is the only one, so it fetches none.
NO_MEDIA_DOMAIN = "media.invalid"


@dataclass(frozen=True)
class EngineLaunch:
    index: int  # over every model's replicas: its port is base_port + index
    model: str  # the served name
    url: str
    port: int
    argv: list[str]
    env: dict[str, str]  # over this process's environment
    log_path: Path
    unset: tuple[str, ...] = ()  # variables of this process's environment not passed on
    cpus: tuple[int, ...] = ()  # the CPUs its processes are confined to; empty: not confined
    nice: int = 0  # added to its processes' niceness


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _refuse_what_cannot_run(
    served: list[ServedModelSettings], names: list[str], hardware: Hardware
) -> None:
    for model, name in zip(served, names, strict=True):
        for arg in model.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                raise SetupError(f"{flag} in the extra vLLM flags of {name}: use qwenstack's "
                                 f"{MANAGED_FLAGS[flag]}")
            if flag in roles.ROLE_FLAGS:
                raise SetupError(f"{flag} in the extra vLLM flags of {name}: set its role "
                                 "(chat, embed or rerank) instead")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SetupError(f"Two models are served as {', '.join(twice)}: give each its own "
                         "served_model_name")
    if hardware.has_gpu and (refusal := gpus_refusal(
            served, names, len(hardware.gpu_memory_bytes))):
        raise SetupError(f"On this machine: {refusal}")


def gpus_refusal(served: list[ServedModelSettings], names: list[str], gpus: int) -> str | None:
    """Why these models' replicas do not fit on `gpus` GPUs (each replica has GPUs of its own),
    listing what each asks and how many replicas of each would fit; None when they do."""
    needed = sum(model.replicas * model.tensor_parallel_size for model in served)
    if needed <= gpus:
        return None
    asks = ", ".join(f"{name}: {model.replicas} replicas x tensor-parallel-size "
                     f"{model.tensor_parallel_size}" for model, name in zip(served, names,
                                                                           strict=True))
    minimum = sum(model.tensor_parallel_size for model in served)
    if minimum > gpus:
        advice = (f"even one replica of each needs {minimum}: serve fewer models here, or give "
                  "some a smaller tensor-parallel-size")
    else:
        spare = gpus - minimum
        fits = ", ".join(f"{name} {1 + spare // model.tensor_parallel_size}"
                         for model, name in zip(served, names, strict=True))
        advice = f"with the others at one replica, each fits at most: {fits}"
    return f"{asks}: needs {needed} GPUs; there are {gpus} ({advice})"


def _tuning_flags(
    engine: EngineSettings, model: ServedModelSettings, hardware: Hardware,
    budget: capacity.KvBudget,
) -> list[str]:
    flags = [
        "--tensor-parallel-size", str(model.tensor_parallel_size),
        "--gpu-memory-utilization", str(model.gpu_memory_utilization),
    ]
    if model.enable_chunked_prefill and model.role == roles.CHAT:
        flags.append("--enable-chunked-prefill")
    if model.max_num_seqs is not None:
        flags += ["--max-num-seqs", str(model.max_num_seqs)]
    if engine.stream_interval != 1:  # 1 is vLLM's own default
        flags += ["--stream-interval", str(engine.stream_interval)]
    if model.kv_cache_gib is not None or not hardware.has_gpu:
        # Sized by us, so that vLLM allocates exactly the budget checked above.
        flags += ["--kv-cache-memory-bytes", str(budget.bytes)]
    if not hardware.has_gpu and engine.cpu_eager and "--enforce-eager" not in model.extra_args:
        flags.append("--enforce-eager")
    return flags


def _cpu_env(engine: EngineSettings, python: Path) -> tuple[dict[str, str], list[str]]:
    """What every CPU engine's environment gets (cpu_tuning.py says why); the thread binding,
    which differs per engine, is added by the caller. Returns the env and a warning per
    missing library."""
    env: dict[str, str] = {}
    missing: list[str] = []
    if engine.cpu_preload:
        env["LD_PRELOAD"], missing = cpu_tuning.preload(
            python.parent.parent, os.environ.get("LD_PRELOAD", ""))
        if not env["LD_PRELOAD"]:
            del env["LD_PRELOAD"]
    return env, missing


@dataclass(frozen=True)
class Sizing:
    """How one model's engines are sized: what each replica is given."""

    dtype: str
    max_model_len: int
    budget: capacity.KvBudget
    weight_bytes: int  # all of its weights, in `dtype`


def _sizing(engine: ServedModelSettings, model: ResolvedModel, hardware: Hardware) -> Sizing:
    """The dtype, the context to serve and the KV-cache budget; a context shorter than the
    model's is said in the log."""
    shape = capacity.ModelShape.from_config(model.config)
    dtype = capacity.resolve_dtype(engine.dtype, shape, hardware)
    weight_bytes = capacity.dtype_bytes(dtype, shape, hardware)
    kv_cache_dtype = _flag_value(engine.extra_args, "--kv-cache-dtype") or "auto"
    kv_bytes = (weight_bytes if kv_cache_dtype == "auto"
                else capacity.DTYPE_BYTES.get(kv_cache_dtype, 2))
    budget = capacity.kv_budget(
        shape, weight_bytes, hardware,
        tensor_parallel_size=engine.tensor_parallel_size,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_gib=engine.kv_cache_gib,
    )
    max_model_len = capacity.max_model_len_to_serve(shape, engine.max_model_len, kv_bytes, budget)
    if engine.max_model_len is None and max_model_len < shape.max_positions:
        log.warning(
            "%s: serving a context of %d tokens: the model's %d do not fit in %.1f GiB of KV "
            "cache (raise it with %s).", model.served_name,
            max_model_len, shape.max_positions, budget.bytes / capacity.GIB, budget.how_to_raise,
        )
    return Sizing(dtype, max_model_len, budget, shape.num_params * weight_bytes)


def _refuse_more_memory_than_there_is(
    served: list[ServedModelSettings], names: list[str], sizings: list[Sizing],
    hardware: Hardware,
) -> None:
    """CPU engines hold their weights and KV caches in this machine's memory: all of them
    together must fit in what is available now."""
    needs = [entry.replicas * (sizing.weight_bytes + sizing.budget.bytes)
             for entry, sizing in zip(served, sizings, strict=True)]
    if not hardware.ram_available_bytes or sum(needs) <= hardware.ram_available_bytes:
        return
    each = ", ".join(
        f"{name}: {entry.replicas} x ({sizing.weight_bytes / capacity.GIB:.1f} GiB weights + "
        f"{sizing.budget.bytes / capacity.GIB:.1f} GiB KV cache)"
        for entry, name, sizing in zip(served, names, sizings, strict=True))
    raise SetupError(
        f"{each}: {sum(needs) / capacity.GIB:.1f} GiB, but this machine has "
        f"{hardware.ram_available_bytes / capacity.GIB:.1f} GiB available; give the engines "
        "less KV cache (--kv-cache-gib, or kv_cache_gib per model) or fewer replicas")


def model_argv(
    engine: ServedModelSettings, model: ResolvedModel, sizing: Sizing, python: Path,
    allowed_media_domains: list[str], *, tuning: EngineSettings, hardware: Hardware,
) -> list[str]:
    """One model's vLLM command line, but its port: the same for each of its replicas."""
    return [
        str(python), "-m", VLLM_SERVER,
        "--model", model.source,
        "--served-model-name", model.served_name,
        "--host", ENGINE_HOST,
        "--dtype", sizing.dtype,
        "--max-model-len", str(sizing.max_model_len),
        "--allowed-media-domains", *(allowed_media_domains or [NO_MEDIA_DOMAIN]),
        *roles.flags(engine.role, model.config),
        *_tuning_flags(tuning, engine, hardware, sizing.budget),
        *parsers(engine, model).flags(),
        *(lora.flags(engine.lora) if engine.role == roles.CHAT else []),
    ]


def parsers(engine: ServedModelSettings, model: ResolvedModel) -> families.Parsers:
    """The tool-call and reasoning parsers a model's engines run: its family's for chat."""
    if engine.role != roles.CHAT:
        return families.Parsers(None, None)
    return families.choose(engine, model.config, model.chat_template)


def build_launches(
    engine: EngineSettings,
    models: list[ResolvedModel],
    hardware: Hardware,
    python: Path,
    log_dir: Path,
    allowed_media_domains: list[str],
) -> list[EngineLaunch]:
    """Every engine of every model: `models` are `engine.served()` resolved, in its order.
    `allowed_media_domains`: hosts the engines may fetch media URLs from, the gateway's own
    allowlist (a request naming another is refused before either)."""
    served = engine.served()
    names = [model.served_name for model in models]
    _refuse_what_cannot_run(served, names, hardware)
    sizings = [_sizing(entry, model, hardware) for entry, model in zip(served, models,
                                                                        strict=True)]
    if not hardware.has_gpu:
        _refuse_more_memory_than_there_is(served, names, sizings, hardware)
    commons = [model_argv(entry, model, sizing, python, allowed_media_domains, tuning=engine,
                          hardware=hardware)
               for entry, model, sizing in zip(served, models, sizings, strict=True)]
    # Bytecode written: the engine venv is installed without it (venv.py), so each module vLLM
    # imports is compiled on the first start and kept; an inherited PYTHONDONTWRITEBYTECODE
    # would compile them all again at every start.
    base_env = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": ""}
    if engine.hf_token:
        base_env["HF_TOKEN"] = engine.hf_token.get_secret_value()
    ranks = [entry.tensor_parallel_size for entry in served for _ in range(entry.replicas)]
    binds: list[str] = []
    cpus: list[tuple[int, ...]] = [() for _ in ranks]
    if not hardware.has_gpu:
        cpu_env, missing = _cpu_env(engine, python)
        base_env.update(cpu_env)
        for what in missing:
            log.warning("CPU engine without %s: slower, as vLLM will warn.", what)
        for entry, model in zip(served, models, strict=True):
            if entry.lora.enabled and entry.role == roles.CHAT:
                log.warning(
                    "%s serves LoRA adapters on a CPU, where vLLM 0.32 adds an adapter's delta "
                    "to base-model requests batched with it (vllm-project/vllm#48421): serve the "
                    "base model from an engine without adapters too, or use adapters only.",
                    model.served_name)
        if engine.cpu_threads_bind:
            binds = [engine.cpu_threads_bind] * len(ranks)
            if engine.cpu_confine:
                log.warning("engine.cpu_confine is ignored with engine.cpu_threads_bind: the "
                            "cores of a binding given by hand are vLLM's to read, not ours.")
        else:
            cores = cpu_tuning.allowed_cores()
            binds = cpu_tuning.threads_binds(cores, ranks)
            if engine.cpu_confine:
                cpus = cpu_tuning.engine_cores(cores, ranks)

    launches: list[EngineLaunch] = []
    first_gpu = 0
    for entry, model, common in zip(served, models, commons, strict=True):
        for _ in range(entry.replicas):
            index = len(launches)
            port = engine.base_port + index
            env = {**base_env, **lora.environment(entry.lora)}
            if hardware.has_gpu:
                gpus = range(first_gpu, first_gpu + entry.tensor_parallel_size)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
                first_gpu += entry.tensor_parallel_size
            else:
                env["VLLM_CPU_OMP_THREADS_BIND"] = binds[index]
            launches.append(EngineLaunch(
                index=index,
                model=model.served_name,
                url=f"http://{ENGINE_HOST}:{port}",
                port=port,
                argv=[*common, "--port", str(port), *entry.extra_args],
                env=env,
                log_path=log_dir / f"engine-{index}.log",
                unset=() if hardware.has_gpu else cpu_tuning.UNSET_ENV,
                cpus=cpus[index],
                nice=engine.nice,
            ))
    return launches
