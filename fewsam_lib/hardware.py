"""What this machine's processor can do, read once from ``/proc/cpuinfo``."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slowly
    (one MobileSAM encoder call took about 50 times as long under emulation on an AVX2 machine)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
