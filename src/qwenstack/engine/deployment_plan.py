"""Sizing a deployment on GPUs this machine does not have: `qwenstack plan`.

The same arithmetic the engine manager uses to refuse impossible settings (capacity.py), run
against GPUs from the table in gpu_catalog.py instead of the detected hardware.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.engine import capacity, launch, models
from qwenstack.engine.gpu_catalog import Gpu
from qwenstack.engine.hardware import GIB, Hardware
from qwenstack.errors import SetupError
from qwenstack.settings import QWEN3_MODEL
from qwenstack.settings.engine import ServedModelSettings

KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the weights' dtype


@dataclass(frozen=True)
class DeploymentPlan:
    model: str
    gpu: Gpu
    gpu_count: int
    gpu_memory_utilization: float
    dtype: str
    dtype_advice: str
    kv_cache_dtype: str
    weights_bytes: int
    kv_bytes_per_token: int
    kv_formula: str
    kv_cache_bytes: int
    kv_tokens: int  # whole 16-token blocks, as vLLM allocates them
    longest_context: int  # what fits, capped at the model's positions
    context: int
    sequences_at_context: int
    concurrency: int
    decode_bound_single: float | None  # tokens/s: one sequence, empty context
    # tokens/s: the sequences that fit (up to concurrency) at context
    decode_bound_total: float | None
    refusal: str | None  # why `context` cannot be served, and what fits

    @property
    def max_num_seqs(self) -> int:
        return max(1, min(self.concurrency, self.sequences_at_context))

    def vllm_flags(self) -> list[str]:
        flags = [
            "--model", self.model,
            "--dtype", self.dtype,
            "--max-model-len", str(min(self.context, self.longest_context)),
            "--tensor-parallel-size", str(self.gpu_count),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--max-num-seqs", str(self.max_num_seqs),
        ]
        if self.kv_cache_dtype != "auto":
            flags += ["--kv-cache-dtype", self.kv_cache_dtype]
        return flags

    def figures(self) -> list[tuple[str, str]]:
        """What `qwenstack plan` prints: one (label, value) row per figure."""
        gpu = self.gpu
        bandwidth = f", {gpu.bandwidth_gb_s:,.0f} GB/s" if gpu.bandwidth_gb_s else ""

        def rate(tokens_s: float | None) -> str:
            return "-" if tokens_s is None else f"{tokens_s:,.0f} tokens/s"

        running = min(self.concurrency, self.sequences_at_context)
        return [
            ("model", self.model),
            ("GPUs",
             f"{self.gpu_count} x {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB{bandwidth})"),
            ("dtype", f"{self.dtype}: {self.dtype_advice}"),
            ("weights", f"{self.weights_bytes / GIB:.2f} GiB"),
            ("KV cache per token", self.kv_formula),
            ("KV cache", (f"{self.kv_cache_bytes / GIB:.2f} GiB (x {self.gpu_memory_utilization}"
                          " of memory, less weights and 1 GiB per GPU for activations)")),
            ("KV tokens that fit", f"{self.kv_tokens:,}"),
            ("longest context", f"{self.longest_context:,} tokens"),
            (f"sequences of {self.context:,} at once", f"{self.sequences_at_context:,}"
             + ("" if self.sequences_at_context >= self.concurrency else
                f" (fewer than {self.concurrency}: the rest wait or are preempted)")),
            ("decode bound, 1 sequence", rate(self.decode_bound_single)),
            (f"decode bound, {running} x {self.context:,}", rate(self.decode_bound_total)),
        ]


# config.json of the Qwen3 dense models as published on the hub, so planning needs no download.
# (The MoE ones are left out: the sizing here counts dense layers only.)
SHIPPED_CONFIGS = Path(__file__).with_name("model_configs")


def shipped_config(model: str) -> dict[str, Any] | None:
    """A hub model's config.json as shipped with qwenstack, if it is one of them."""
    org, _, name = model.partition("/")
    path = SHIPPED_CONFIGS / org / f"{name}.json"
    if not (org and name) or "/" in name or not path.is_file():
        return None
    return json.loads(path.read_text())


def read_model_config(model: str, hf_token: str | None = None) -> dict[str, Any]:
    """A model's config.json: from a config file, a model folder, the configs shipped with
    qwenstack (the Qwen3 family), or the Hugging Face hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SetupError(f"{model}: the folder has no config.json")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SetupError(f"{path}: not a readable JSON config ({exc})") from None
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise SetupError(f"{model}: no such file or folder, and not a hub id like Org/Name")
    return shipped_config(model) or models.hub_config(model, hf_token)


def advise_dtype(gpu: Gpu, requested: str) -> tuple[str, str]:
    """The dtype to serve in, and why."""
    if requested != "auto":
        if requested not in capacity.DTYPE_BYTES:
            raise SetupError(f"--dtype {requested}: use auto, {', '.join(capacity.DTYPE_BYTES)}")
        if requested == "bfloat16" and not gpu.bf16:
            raise SetupError(
                f"{gpu.name} has no bfloat16 (it predates Ampere): use --dtype float16")
        return requested, "as asked"
    if gpu.bf16:
        return "bfloat16", (
            f"{gpu.name} computes in bfloat16, the dtype Qwen3 and most models ship in")
    return "float16", (
        f"{gpu.name} predates Ampere and has no bfloat16; float16 is the same size, "
        "but its narrower range can overflow where bfloat16 would not"
    )


def _check_options(
    gpu_count: int, concurrency: int, gpu_memory_utilization: float, kv_cache_dtype: str
) -> None:
    if gpu_count < 1 or concurrency < 1:
        raise SetupError("--gpus and --concurrency must be 1 or more")
    if not 0 < gpu_memory_utilization <= 1:
        raise SetupError("--gpu-memory-utilization must be in (0, 1]")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise SetupError(
            f"--kv-cache-dtype {kv_cache_dtype}: use one of {', '.join(KV_CACHE_DTYPES)}")


def _decode_bounds(
    gpu: Gpu, gpu_count: int, weights: int, running: int, kv_bytes_per_sequence: int
) -> tuple[float | None, float | None]:
    """Decode tokens/s bounds from memory bandwidth: one sequence alone, and `running` at once.

    A decode step reads every weight once and each running sequence's KV cache; with tensor
    parallelism the GPUs read their shares at once."""
    if gpu.bandwidth_gb_s is None:
        return None, None
    bandwidth = gpu.bandwidth_gb_s * 1e9 * gpu_count
    total = running * bandwidth / (weights + running * kv_bytes_per_sequence) if running else None
    return bandwidth / weights, total


def plan_deployment(
    model: str,
    config: dict[str, Any],
    gpu: Gpu,
    *,
    gpu_count: int = 1,
    context: int | None = None,
    concurrency: int = 1,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
) -> DeploymentPlan:
    _check_options(gpu_count, concurrency, gpu_memory_utilization, kv_cache_dtype)
    try:
        shape = capacity.ModelShape.from_config(config)
    except (KeyError, TypeError) as exc:
        raise SetupError(
            f"{model}: the config lacks {exc} (not a transformer LM config?)") from None
    context = context or shape.max_positions
    if context < 1:
        raise SetupError("--context must be 1 or more")
    dtype, advice = advise_dtype(gpu, dtype)
    weight_bytes = capacity.DTYPE_BYTES[dtype]
    kv_bytes = weight_bytes if kv_cache_dtype == "auto" else capacity.DTYPE_BYTES[kv_cache_dtype]
    per_token = shape.kv_bytes_per_token(kv_bytes)

    # The engine manager's own budget: GPU memory x utilisation - weights - activation reserve.
    hardware = Hardware((gpu.memory_bytes,) * gpu_count, frozenset(), 0)
    budget = capacity.kv_budget(
        shape, weight_bytes, hardware, tensor_parallel_size=gpu_count,
        gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=None,
    )
    kv_tokens = budget.bytes // per_token // capacity.BLOCK_TOKENS * capacity.BLOCK_TOKENS
    weights = shape.num_params * weight_bytes
    refusal = None
    if budget.bytes == 0:
        refusal = (
            f"The weights alone ({weights / GIB:.1f} GiB in {dtype}) leave no room for a KV cache"
            f" on {gpu_count} x {gpu.name} at --gpu-memory-utilization {gpu_memory_utilization}:"
            " use more GPUs, larger ones, or a smaller dtype."
        )
    else:
        try:
            capacity.max_model_len_to_serve(shape, context, kv_bytes, budget)
        except capacity.ContextDoesNotFit as exc:
            refusal = str(exc)
    blocks_per_sequence = -(-context // capacity.BLOCK_TOKENS)
    sequences = kv_tokens // (blocks_per_sequence * capacity.BLOCK_TOKENS)

    single, total = _decode_bounds(gpu, gpu_count, weights, min(concurrency, sequences),
                                   min(context, kv_tokens) * per_token)
    return DeploymentPlan(
        model=model, gpu=gpu, gpu_count=gpu_count, gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype, dtype_advice=advice, kv_cache_dtype=kv_cache_dtype,
        weights_bytes=weights, kv_bytes_per_token=per_token,
        kv_formula=shape.kv_formula(kv_bytes), kv_cache_bytes=budget.bytes, kv_tokens=kv_tokens,
        longest_context=min(kv_tokens, shape.max_positions), context=context,
        sequences_at_context=sequences, concurrency=concurrency,
        decode_bound_single=single, decode_bound_total=total, refusal=refusal,
    )


def plan_served_models(
    served: list[ServedModelSettings], gpu: Gpu, gpus_available: int, hf_token: str | None = None
) -> tuple[list[tuple[str, DeploymentPlan]], str | None]:
    """Each model of `engine.models` sized on its replica's GPUs (its tensor-parallel size, its
    context and sequences), by served name; and why the set does not fit on `gpus_available`
    GPUs of this kind, with what would (None: it fits)."""
    plans = []
    for entry in served:
        model = entry.model or QWEN3_MODEL  # `up`'s default on a GPU
        plans.append((entry.served_model_name or model, plan_deployment(
            model, read_model_config(model, hf_token), gpu,
            gpu_count=entry.tensor_parallel_size, context=entry.max_model_len,
            concurrency=entry.max_num_seqs or 1, dtype=entry.dtype,
            gpu_memory_utilization=entry.gpu_memory_utilization,
        )))
    return plans, launch.gpus_refusal(served, [name for name, _ in plans], gpus_available)
