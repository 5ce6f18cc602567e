"""How much memory igd may use, and handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import os
from typing import Callable

import torch

CPU_MEMORY_SHARE = 0.5  # of MemAvailable
CUDA_MEMORY_SHARE = 0.7  # of the free device memory


def available_ram() -> int:
    """MemAvailable in bytes (free memory plus what the kernel can reclaim)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(device: torch.device) -> int:
    """Bytes a chunk's activations may take on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_SHARE)
    return int(available_ram() * CPU_MEMORY_SHARE)


def resident_growth(run: Callable[[], object]) -> int | None:
    """How far ``run()`` raised this process's peak resident memory above where it stood
    (freed heap handed back first), in bytes; None where the peak cannot be reset (Linux's
    /proc/self/clear_refs). Other threads' allocations meanwhile count too."""
    release_free_memory()
    try:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # VmHWM := VmRSS
    except OSError:
        return None
    run()
    return max(_status_bytes("VmHWM") - before, 0)


def resident_bytes() -> int:
    """This process's resident memory now (0 where there is no /proc)."""
    try:
        return _status_bytes("VmRSS")
    except OSError:
        return 0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def release_free_memory() -> None:
    """Hand freed heap memory back to the system. A pass frees tens of MB of path points
    and gradients (chunk-size measurement, GBs); glibc keeps such memory in its arenas,
    where it would show as resident memory that never shrinks."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
