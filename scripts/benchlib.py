"""What every benchmark script records about the machine it ran on (imported by the scripts beside it).

Each result JSON names its machine so figures are compared only like with like: the CPU's marketing name,
visible cores, the 1-minute load average when the run started (other work on a shared machine skews
wall-clock timings), library versions, and the GPU when one is used.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo on Linux, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None, **extra: Any) -> dict[str, Any]:
    """{cpu, cpu_cores_visible, load_average_1m, python, platform, torch, torch_threads, [gpu, gpu_memory_gib]}
    plus `extra` (e.g. the versions of the libraries a benchmark exercises). `device` "cuda[:i]" adds the GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores_visible": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            dev = torch.device(device)
            info["gpu"] = torch.cuda.get_device_name(dev)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    info.update(extra)
    return info
