"""Common data-centre and workstation GPUs, for planning a deployment before buying one.

Memory is what `nvidia-smi --query-gpu=memory.total` reports (MiB), the figure vLLM's
--gpu-memory-utilization is a fraction of, not the marketing "GB". Bandwidth is the vendor's
peak memory bandwidth (GB/s, 10^9 bytes), which bounds decoding: each decode step reads every
weight once. TFLOPS is the vendor's peak dense bfloat16 (float16 before Ampere) tensor-core
figure, which bounds prefill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwenstack.engine.hardware import GIB
from qwenstack.errors import SetupError

MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bandwidth_gb_s: float | None  # None: unknown (a GPU given only by its memory size)
    bf16: bool  # compute capability 8.0 (Ampere) or newer
    # Peak dense 16-bit tensor throughput (TFLOPS, no sparsity), which bounds prefill; None:
    # unknown.
    tflops: float | None = None

    @property
    def known(self) -> bool:
        return self.bandwidth_gb_s is not None


GPUS = [
    Gpu("T4", 15_360 * MIB, 320, False, 65),
    Gpu("V100-16GB", 16_384 * MIB, 900, False, 125),
    Gpu("V100-32GB", 32_768 * MIB, 900, False, 125),
    Gpu("A10", 23_028 * MIB, 600, True, 125),
    Gpu("L4", 23_034 * MIB, 300, True, 121),
    Gpu("RTX3090", 24_576 * MIB, 936, True, 71),
    Gpu("RTX4090", 24_564 * MIB, 1008, True, 165),
    Gpu("A6000", 49_140 * MIB, 768, True, 155),
    Gpu("L40S", 46_068 * MIB, 864, True, 362),
    Gpu("A100-40GB", 40_960 * MIB, 1555, True, 312),
    Gpu("A100-80GB", 81_920 * MIB, 2039, True, 312),
    Gpu("H100-80GB", 81_559 * MIB, 3350, True, 989),  # SXM; the PCIe card has 2,000 GB/s
    Gpu("H200", 143_771 * MIB, 4800, True, 989),
]

# Short names people use for the one common variant.
ALIASES = {"V100": "V100-16GB", "A100": "A100-80GB", "H100": "H100-80GB"}

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gib|gb|g)$", re.IGNORECASE)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def lookup(name_or_size: str) -> Gpu:
    """A GPU by name (`A10`, `a100-80gb`, `H100`) or by memory size (`24GB`, `48GiB`).

    A size alone has no known bandwidth, and is taken as an Ampere-or-newer card (bf16).
    """
    size = _SIZE.match(name_or_size.strip())
    if size:
        gib = float(size[1])
        if gib <= 0:
            raise SetupError(f"--gpu {name_or_size}: the memory size must be above 0")
        return Gpu(f"{size[1]} GiB GPU", int(gib * GIB), None, True)
    wanted = _key(ALIASES.get(name_or_size.strip().upper(), name_or_size))
    for gpu in GPUS:
        if _key(gpu.name) == wanted:
            return gpu
    names = ", ".join(gpu.name for gpu in GPUS)
    raise SetupError(
        f"--gpu {name_or_size}: not a GPU in the table ({names}); or give its memory, e.g. 24GB"
    )
