"""GPU utilisation and memory through NVML, for the GPUs of the gateway's host.

Exported only where NVML starts (an NVIDIA driver is present); on other machines the
collector is simply not registered and the metrics are absent. With `qwenstack up` the engines
run on this host, so these are their GPUs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

UTILIZATION = "qwenstack_gpu_utilization_ratio"
MEMORY_USED = "qwenstack_gpu_memory_used_bytes"
MEMORY_TOTAL = "qwenstack_gpu_memory_total_bytes"
METRICS = (UTILIZATION, MEMORY_USED, MEMORY_TOTAL)


class GpuCollector:
    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def start(cls) -> GpuCollector | None:
        """A collector for every GPU NVML sees, or None without NVIDIA GPUs."""
        if shutil.which("nvidia-smi") is None:  # no driver: skip loading NVML at all
            return None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception as exc:  # ImportError, or NVMLError when the driver is unusable
            log.warning("No GPU metrics: NVML did not start (%s)", exc)
            return None
        return cls(pynvml, handles)

    def stop(self) -> None:
        self.nvml.nvmlShutdown()

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily(
            UTILIZATION, "Share of time a kernel ran on the GPU.", labels=["gpu"]
        )
        used = GaugeMetricFamily(MEMORY_USED, "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily(MEMORY_TOTAL, "GPU memory in all.", labels=["gpu"])
        for index, handle in enumerate(self.handles):
            gpu = str(index)
            utilization.add_metric([gpu], self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([gpu], memory.used)
            total.add_metric([gpu], memory.total)
        yield utilization
        yield used
        yield total
