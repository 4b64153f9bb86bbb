"""What the numbers were measured on: `machine_info()` and `versions()`, recorded in every results.json."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

KEY_PACKAGES = ("llmopt", "torch", "numpy", "transformers", "tokenizers", "safetensors", "accelerate", "peft",
                "bitsandbytes", "torchao", "galore-torch", "torch-optimizer", "triton", "nvidia-ml-py",
                "matplotlib")
"""Packages whose versions a report records when installed."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores (logical and usable), torch threads, memory, OS, Python, torch and CUDA devices."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_total_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {"version": torch.version.cuda,
                        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    return info


def versions(packages: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """{distribution name: version} of the installed ones among `packages`; missing ones are omitted."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
