"""LoRA adapters as vLLM flags and environment: what an engine serving adapters is started with.

vLLM serves each adapter under its own model name beside the base model (--lora-modules), in
batches that mix up to --max-loras adapters of rank up to --max-lora-rank. Loading more while
it runs takes VLLM_ALLOW_RUNTIME_LORA_UPDATING, which opens the engine's /v1/load_lora_adapter
and /v1/unload_lora_adapter: engines listen on loopback only, and the gateway forwards neither;
admins load adapters through the gateway's /admin/lora_adapters (gateway/lora.py).
"""

from __future__ import annotations

import json

from qwenstack.settings import LoraSettings

# Flags these settings own; in extra_args they would fight them.
LORA_FLAGS = ("--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras")
RUNTIME_UPDATES = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def flags(lora: LoraSettings) -> list[str]:
    """vLLM's flags for these adapters ([] when none are served and none may be loaded)."""
    if not lora.enabled:
        return []
    args = ["--enable-lora", "--max-lora-rank", str(lora.max_lora_rank),
            "--max-loras", str(lora.max_loras)]
    if lora.adapters:
        # The JSON form: a folder may hold `=`, which the name=path form would split on.
        args += ["--lora-modules", *(json.dumps({"name": name, "path": path})
                                     for name, path in lora.adapters.items())]
    return args


def environment(lora: LoraSettings) -> dict[str, str]:
    """What the engine's environment needs for these settings."""
    return {RUNTIME_UPDATES: "True"} if lora.runtime_loading else {}
