"""What an engine serves its model for, as vLLM's flags: the one place roles become flags.

- chat: vLLM's default generate runner, with the tool-call and reasoning parsers of the model's
  family (families.py) and chunked prefill as set.
- embed: the pooling runner with the model converted to an embedder (`--runner pooling
  --convert embed`), serving /v1/embeddings.
- rerank: the pooling runner with the model converted to a classifier (`--convert classify`),
  serving /rerank, /v1/rerank and /score. An original Qwen3 reranker (a Qwen3ForCausalLM
  checkpoint that answers "yes" or "no") is read as vLLM's docs say: as
  Qwen3ForSequenceClassification scoring from its "no" and "yes" tokens.
"""

from __future__ import annotations

import json
from typing import Any

from qwenstack.engine import families
from qwenstack.settings.engine import Role

CHAT: Role = "chat"
POOLING_CONVERSION: dict[Role, str] = {"embed": "embed", "rerank": "classify"}
QWEN3_RERANKER_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
# Set here by role; in extra_args they would contradict it.
ROLE_FLAGS = ("--runner", "--convert", "--task")


def flags(role: Role, config: dict[str, Any]) -> list[str]:
    """vLLM's flags for serving a model of this config.json in this role."""
    if role == CHAT:
        return []
    role_flags = ["--runner", "pooling", "--convert", POOLING_CONVERSION[role]]
    if role == "rerank" and is_original_qwen3_reranker(config):
        role_flags += ["--hf-overrides", json.dumps(QWEN3_RERANKER_OVERRIDES)]
    return role_flags


def is_original_qwen3_reranker(config: dict[str, Any]) -> bool:
    """A Qwen3 causal LM: what Qwen3-Reranker ships as (a converted one is a classifier)."""
    return (families.model_type(config).startswith("qwen3")
            and "Qwen3ForCausalLM" in config.get("architectures", []))
