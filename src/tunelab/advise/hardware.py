"""Whether the machine multiplies bf16 matrices fast, which decides if a bf16 frozen base is worth it.

A bf16 base (`model.dtype: bfloat16`) halves the base weights' bytes and, where the hardware has bf16 matmul
units, speeds the frozen matmuls up: on x86 CPUs the AVX512_BF16 instructions (Cooper Lake, Zen 4 and later) or
AMX tiles (Sapphire Rapids and later), which Linux lists as the `avx512_bf16` and `amx_bf16` flags in
/proc/cpuinfo; on NVIDIA GPUs compute capability 8.0 (Ampere) and later. Without them oneDNN converts bf16 to
float32 around every matmul, so a bf16 base saves memory but runs slower than a float32 one.

Both probes can be handed their answer (`flags`, `capability`), so the rule is tested without the machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
FAST_BF16_GPU_CAPABILITY = (8, 0)
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or in the text given); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:  # not Linux: no flags to read
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return set(value.split())
    return set()


def gpu_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def bf16_matmul(device: str, flags: Iterable[str] | None = None,
                capability: tuple[int, int] | None = None) -> dict:
    """{"fast": bool, "why": str}: whether `device` ("cpu" or "cuda") has bf16 matmul in hardware, and the
    evidence, from `flags` (default: this machine's /proc/cpuinfo) or `capability` (default: GPU 0's)."""
    if device == "cuda":
        capability = capability or gpu_capability()
        if capability is None:
            return {"fast": False, "why": "no CUDA GPU to ask"}
        got = ".".join(map(str, capability))
        if tuple(capability) >= FAST_BF16_GPU_CAPABILITY:
            return {"fast": True, "why": f"the GPU's compute capability {got} has bf16 tensor cores"}
        return {"fast": False, "why": f"the GPU's compute capability {got} is below 8.0: no bf16 tensor cores"}
    found = sorted(set(cpu_flags() if flags is None else flags) & set(FAST_BF16_CPU_FLAGS))
    if found:
        return {"fast": True, "why": f"this CPU has {' and '.join(found)}"}
    return {"fast": False, "why": f"this CPU has neither {' nor '.join(FAST_BF16_CPU_FLAGS)}"}
