"""The command line and environment of each vLLM replica, checked before anything starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qwenstack.engine import capacity, cpu_tuning, families, lora
from qwenstack.engine.hardware import Hardware
from qwenstack.engine.models import ResolvedModel
from qwenstack.errors import SetupError
from qwenstack.settings import ENGINE_HOST, EngineSettings

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
    index: int
    url: str
    port: int
    argv: list[str]
    env: dict[str, str]  # over this process's environment
    log_path: Path
    unset: tuple[str, ...] = ()  # variables of this process's environment not passed on


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _refuse_what_cannot_run(engine: EngineSettings, hardware: Hardware) -> None:
    for arg in engine.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise SetupError(
                f"{flag} in the extra vLLM flags: use qwenstack's {MANAGED_FLAGS[flag]}")
    gpus_needed = engine.replicas * engine.tensor_parallel_size
    if hardware.has_gpu and gpus_needed > len(hardware.gpu_memory_bytes):
        raise SetupError(
            f"{engine.replicas} replicas x tensor-parallel-size {engine.tensor_parallel_size} needs"
            f" {gpus_needed} GPUs; this machine has {len(hardware.gpu_memory_bytes)}"
        )


def _tuning_flags(
    engine: EngineSettings, hardware: Hardware, budget: capacity.KvBudget
) -> list[str]:
    flags = [
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
    ]
    if engine.enable_chunked_prefill:
        flags.append("--enable-chunked-prefill")
    if engine.max_num_seqs is not None:
        flags += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.kv_cache_gib is not None or not hardware.has_gpu:
        # Sized by us, so that vLLM allocates exactly the budget checked above.
        flags += ["--kv-cache-memory-bytes", str(budget.bytes)]
    if not hardware.has_gpu and engine.cpu_eager and "--enforce-eager" not in engine.extra_args:
        flags.append("--enforce-eager")
    return flags


def _cpu_env(engine: EngineSettings, python: Path) -> tuple[dict[str, str], list[str]]:
    """What every CPU replica's environment gets (cpu_tuning.py says why); the thread binding,
    which differs per replica, is added by the caller. Returns the env and a warning per
    missing library."""
    env: dict[str, str] = {}
    missing: list[str] = []
    if engine.cpu_preload:
        env["LD_PRELOAD"], missing = cpu_tuning.preload(
            python.parent.parent, os.environ.get("LD_PRELOAD", ""))
        if not env["LD_PRELOAD"]:
            del env["LD_PRELOAD"]
    return env, missing


def _sizing(
    engine: EngineSettings, model: ResolvedModel, hardware: Hardware
) -> tuple[str, int, capacity.KvBudget]:
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
            "Serving a context of %d tokens: the model's %d do not fit in %.1f GiB of KV cache "
            "(raise it with %s).",
            max_model_len, shape.max_positions, budget.bytes / capacity.GIB, budget.how_to_raise,
        )
    return dtype, max_model_len, budget


def build_launches(
    engine: EngineSettings,
    model: ResolvedModel,
    hardware: Hardware,
    python: Path,
    log_dir: Path,
    allowed_media_domains: list[str],
) -> list[EngineLaunch]:
    """The replicas' launches. `allowed_media_domains`: hosts the engines may fetch media URLs
    from, the gateway's own allowlist (a request naming another is refused before either)."""
    _refuse_what_cannot_run(engine, hardware)
    dtype, max_model_len, budget = _sizing(engine, model, hardware)
    common = [
        str(python), "-m", VLLM_SERVER,
        "--model", model.source,
        "--served-model-name", model.served_name,
        "--host", ENGINE_HOST,
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--allowed-media-domains", *(allowed_media_domains or [NO_MEDIA_DOMAIN]),
        *_tuning_flags(engine, hardware, budget),
        *families.choose(engine, model.config, model.chat_template).flags(),
        *lora.flags(engine.lora),
    ]
    # Bytecode written: the engine venv is installed without it (venv.py), so each module vLLM
    # imports is compiled on the first start and kept; an inherited PYTHONDONTWRITEBYTECODE
    # would compile them all again at every start.
    base_env = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "",
                **lora.environment(engine.lora)}
    if engine.hf_token:
        base_env["HF_TOKEN"] = engine.hf_token.get_secret_value()
    binds: list[str] = []
    if not hardware.has_gpu:
        cpu_env, missing = _cpu_env(engine, python)
        base_env.update(cpu_env)
        for what in missing:
            log.warning("CPU engine without %s: slower, as vLLM will warn.", what)
        binds = ([engine.cpu_threads_bind] * engine.replicas if engine.cpu_threads_bind
                 else cpu_tuning.threads_binds(
                     cpu_tuning.allowed_cores(), engine.replicas, engine.tensor_parallel_size))

    launches = []
    for index in range(engine.replicas):
        port = engine.base_port + index
        env = dict(base_env)
        if hardware.has_gpu:
            first = index * engine.tensor_parallel_size
            gpus = range(first, first + engine.tensor_parallel_size)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binds[index]
        launches.append(EngineLaunch(
            index=index,
            url=f"http://{ENGINE_HOST}:{port}",
            port=port,
            argv=[*common, "--port", str(port), *engine.extra_args],
            env=env,
            log_path=log_dir / f"engine-{index}.log",
            unset=() if hardware.has_gpu else cpu_tuning.UNSET_ENV,
        ))
    return launches
