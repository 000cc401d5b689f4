"""The gateway: the OpenAI-compatible front door on port 8000."""
