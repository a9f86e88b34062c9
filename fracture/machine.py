"""What the machine is, for the lines that name it (benchmarks, cards, training logs); torch-free.

A speed figure means nothing without its CPU: every benchmark names it from here, and training picks its
precision from the same flags (bf16-mixed only where the CPU computes bf16 natively).
"""

from __future__ import annotations

import platform


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8480+"), or the platform's word for it elsewhere."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX): where bf16-mixed trains 2.1-2.5x faster (README table)."""
    flags = set((_cpuinfo("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})
