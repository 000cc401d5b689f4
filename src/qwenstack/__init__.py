"""qwenstack: Qwen3 on vLLM behind an OpenAI-compatible gateway."""
