"""What vLLM's CPU guide asks of a CPU engine's environment.

- tcmalloc and Intel OpenMP preloaded (`LD_PRELOAD`): vLLM warns at start without them.
  libiomp5.so comes from PyPI's `intel-openmp`, installed in the engine venv (venv.py);
  tcmalloc from Debian's `libtcmalloc-minimal4`, which the engine install gets with apt where
  it runs as root. A library that is missing is left out, with one warning line.
- OpenMP threads bound to cores (`VLLM_CPU_OMP_THREADS_BIND`), one per physical core, with
  one core kept back for the processes that serve (vLLM's API server and scheduler, the
  gateway, the UI) whenever the machine has a core to spare, as vLLM's own `auto` does. On 2
  shared cores, binding both to the model made it 1.2x faster at 32 concurrent requests in
  one round and 3x slower at 1 in the next, with more other work on the machine
  (benchmarks/RESULTS.md): an OpenMP thread that loses its core holds up the others at every
  barrier. vLLM's `auto` binds every replica to the same cores, though; here the replicas
  split them.
- `engine.cpu_confine` runs all of each engine's processes on its own cores, the kept-back
  core not among them. vLLM's scheduler process (EngineCore) spin-waits on its worker's
  shared-memory queue for a second after each message (sched_yield; `busy_loop_s`, hard-coded
  in vLLM 0.32, whose own binding reserves a core for it), so while its engine generates it
  keeps a core busy: on its worker's core it yields to the worker. Engines then use less CPU
  per token and leave more to other work (the test suite's five engines on 2 cores: 629
  CPU-seconds instead of 871, the suite 15 % faster), but serve fewer tokens/s when nothing
  else wants the CPU (3 engines on 2 cores, 8 concurrent requests each: 100 tokens/s against
  125-138; benchmarks/RESULTS.md), so it is off by default.
- The KV-cache size given once: qwenstack passes the budget it checked as
  `--kv-cache-memory-bytes` (exact bytes). vLLM's `VLLM_CPU_KVCACHE_SPACE` (whole GiB) would
  override it, so an inherited one is not passed on.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Where Debian, Fedora and source builds put the shared library, most specific first.
SYSTEM_LIBRARY_DIRS = (
    Path(f"/usr/lib/{platform.machine()}-linux-gnu"),
    Path("/usr/lib64"),
    Path("/usr/lib"),
    Path("/usr/local/lib"),
)
# The minimal build is the one vLLM's guide names: malloc only, no heap profiler.
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so.4",
                  "libtcmalloc.so")
IOMP_NAME = "libiomp5.so"
# The Debian package with tcmalloc, and PyPI's with Intel OpenMP (x86-64 builds only).
TCMALLOC_DEBIAN_PACKAGE = "libtcmalloc-minimal4"
IOMP_PYPI_PACKAGE = "intel-openmp"
# Environment variables that would fight what qwenstack sets as flags.
UNSET_ENV = ("VLLM_CPU_KVCACHE_SPACE",)
SYS_CPU = Path("/sys/devices/system/cpu")


def wants_iomp() -> bool:
    """Intel OpenMP exists for x86-64 only; elsewhere vLLM preloads PyTorch's libgomp itself."""
    return platform.machine() in ("x86_64", "AMD64")


def find_tcmalloc() -> Path | None:
    for directory in SYSTEM_LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def find_iomp(venv: Path) -> Path | None:
    """The engine venv's libiomp5.so: intel-openmp's wheel puts it in <venv>/lib."""
    path = venv / "lib" / IOMP_NAME
    return path if path.is_file() else None


def preload(venv: Path, inherited: str = "") -> tuple[str, list[str]]:
    """LD_PRELOAD for a CPU engine, tcmalloc first as in vLLM's guide, and what is missing."""
    found, missing = [], []
    tcmalloc = find_tcmalloc()
    if tcmalloc:
        found.append(str(tcmalloc))
    else:
        missing.append(f"tcmalloc (Debian: apt-get install {TCMALLOC_DEBIAN_PACKAGE})")
    if wants_iomp():
        iomp = find_iomp(venv)
        if iomp:
            found.append(str(iomp))
        else:
            missing.append(f"Intel OpenMP (pip install {IOMP_PYPI_PACKAGE} in {venv})")
    return ":".join([*found, *filter(None, inherited.split(":"))]), missing


def physical_cores(cpus: Iterable[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """The first logical CPU of each physical core among `cpus` (hyper-threads share a core's
    arithmetic units; vLLM's guide binds one thread per physical core)."""
    seen: dict[tuple[str, str], int] = {}
    for cpu in sorted(cpus):
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            key = ((topology / "physical_package_id").read_text().strip(),
                   (topology / "core_id").read_text().strip())
        except OSError:
            key = ("", str(cpu))  # no topology: each CPU its own core
        seen.setdefault(key, cpu)
    return sorted(seen.values())


def allowed_cores() -> list[int]:
    """This process's CPUs (a container's cpuset included), one per physical core."""
    return physical_cores(os.sched_getaffinity(0))


def id_list(cpus: Sequence[int]) -> str:
    """`0-3,6` for [0, 1, 2, 3, 6]: the form VLLM_CPU_OMP_THREADS_BIND reads."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def _rank_cores(cores: Sequence[int], ranks: Sequence[int]) -> list[list[list[int]]]:
    """Each engine's cores, per tensor-parallel rank (threads_binds says how they are split)."""
    groups = sum(ranks)
    if len(cores) > groups:
        cores = cores[:-1]
    if len(cores) >= groups:
        size, extra = divmod(len(cores), groups)
        lists, at = [], 0
        for g in range(groups):
            n = size + (1 if g < extra else 0)
            lists.append(list(cores[at:at + n]))
            at += n
    else:
        lists = [[cores[g % len(cores)]] for g in range(groups)]
    engines, first = [], 0
    for engine_ranks in ranks:
        engines.append(lists[first:first + engine_ranks])
        first += engine_ranks
    return engines


def threads_binds(cores: Sequence[int], ranks: Sequence[int]) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND for each engine, given its tensor-parallel ranks: its ranks'
    core lists joined by `|`. The last core is kept back when there are more cores than ranks
    in all; the others are split into that many contiguous groups, as even as they go. With
    fewer cores than groups, groups share cores round-robin."""
    return ["|".join(id_list(group) for group in engine)
            for engine in _rank_cores(cores, ranks)]


def engine_cores(cores: Sequence[int], ranks: Sequence[int]) -> list[tuple[int, ...]]:
    """The cores each engine's OpenMP threads are bound to (threads_binds' lists, joined)."""
    return [tuple(sorted({core for rank in engine for core in rank}))
            for engine in _rank_cores(cores, ranks)]
