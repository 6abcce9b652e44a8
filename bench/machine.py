"""What every bench prints first: the machine its figures were taken on.

CPU model, the instruction sets that decide float32 and bf16 speed (AVX2, AVX-512, AVX-512
BF16, AMX), torch's threads, whether torch sees native CPU bf16, the GPU if any, and the
machine's own 2048 x 2048 matrix-product rate in float64, float32 and bf16, measured now,
so that figures from two machines are never compared blind.

    python bench/machine.py
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

from bnet.training.loop import cpu_has_native_bf16

INSTRUCTION_SETS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
GEMM_SIZE = 2048
GEMM_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.bfloat16}


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """From /proc/cpuinfo where there is one."""
    model, fields = platform.processor() or platform.machine(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if key.strip() == "flags":
                break
    except OSError:
        pass
    if "model name" in fields:  # family and model tell apart kinds a VM names alike ("AMD EPYC")
        model = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return model, set(fields.get("flags", "").split())


@functools.cache
def gemm_rate(precision: str = "float32", device: str = "cpu") -> float:
    """GFLOP/s of a 2048 x 2048 matrix product in ``precision``, best of 3 after a warm-up
    (bf16 on a CPU without it is emulated, and slow)."""
    a, b = (torch.rand(GEMM_SIZE, GEMM_SIZE, device=device).to(GEMM_DTYPES[precision]) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE ** 3 / best / 1e9


def describe() -> str:
    """A few lines naming the machine and its GEMM rates."""
    model, flags = cpu_model_and_flags()
    sets = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in INSTRUCTION_SETS)
    rates = ", ".join(f"{name} {gemm_rate(name):.0f}" for name in GEMM_DTYPES)
    lines = [f"CPU {model}; {sets}",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, native CPU bf16: {cpu_has_native_bf16()}; "
             f"CPU GEMM {GEMM_SIZE}^2 GFLOP/s: {rates}"]
    if torch.cuda.is_available():
        cuda_rates = ", ".join(f"{name} {gemm_rate(name, 'cuda'):.0f}" for name in GEMM_DTYPES)
        lines.append(f"GPU {torch.cuda.get_device_name()}; GEMM GFLOP/s: {cuda_rates}")
    else:
        lines.append("GPU: none")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
