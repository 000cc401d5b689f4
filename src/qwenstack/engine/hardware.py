"""What this machine offers an engine: GPUs and their memory, CPU features, RAM."""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    gpu_memory_bytes: tuple[int, ...]  # one entry per CUDA device
    cpu_flags: frozenset[str]
    ram_available_bytes: int

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_memory_bytes)

    @property
    def cpu_has_bf16(self) -> bool:
        # Without AVX512-BF16, vLLM's CPU kernels produced wrong greedy output in bfloat16.
        return "avx512_bf16" in self.cpu_flags or "amx_bf16" in self.cpu_flags


def _nvidia_gpu_memory() -> tuple[int, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(line) * 1024**2 for line in out.split() if line.strip().isdigit())


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _ram_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@functools.cache
def detect() -> Hardware:
    return Hardware(_nvidia_gpu_memory(), _cpu_flags(), _ram_available())
